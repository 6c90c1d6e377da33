"""masking_reconciliation (docs/functions.md, 6): ``W = M * reshape(w, n, D)``.

``M[i, j] = 1`` where ``tl.rand(seed, i*D + j) < p``: regenerated from the seed wherever it is used,
never stored. ``fixed_mask=False`` draws a new mask on every call (call k's seed derived from (seed, k)).
"""
from __future__ import annotations

import threading

import torch

from .. import _random, ops
from ..base import Reconciliation, Seeded, _saved, add_bias, check_bool, check_seed, reference

# Guards every instance's call counter (two threads, two masks); module level: a lock cannot be pickled.
_calls_lock = threading.Lock()


def mask(seed: int, n: int, D: int, p: float, like: torch.Tensor) -> torch.Tensor:
    u = _random.rand(seed, (n, D), device=like.device, shared=True)
    return (u < torch.tensor(p, dtype=torch.float32)).to(like.dtype)


@reference
def masking_build(w, seed: int, p: float):
    return w * mask(seed, w.shape[1], w.shape[2], p, w)


@reference
def masking_apply(x, w, seed: int, p: float, bias):
    W = masking_build(w, seed, p)
    return add_bias(torch.matmul(x, W.transpose(1, 2)), bias)


ops.implement("masking_build", "torch", masking_build)
ops.implement("masking_apply", "torch", masking_apply)


class masking_reconciliation(Seeded, Reconciliation):
    """W = M * reshape(w, n, D), M ~ Bernoulli(p) frozen (or redrawn per call); l = n*D."""
    number = 6
    degree = 1
    examples = {(4, 6): dict(p=0.5, seed=1), (9, 20): dict(seed=3)}
    bench_args = dict(seed=0)
    op = "masking"
    build_when_small = True
    repr_args = ("p", "fixed_mask", "seed")
    w_alone_sets_W = property(lambda self: self.fixed_mask)   # fixed_mask=False: a new mask per call

    def __init__(self, name="masking_reconciliation", p=0.5, fixed_mask=True, seed=None, **kwargs):
        super().__init__(name, **kwargs)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
        self.p, self.fixed_mask = float(p), check_bool("fixed_mask", fixed_mask)
        self._init_seed(seed)
        self._calls = 0

    def calculate_l(self, n, D):
        return n * D

    def l_formula(self, n, D):
        return f"n*D = {n}*{D} = {n * D}"

    def mask_seed(self) -> int:
        """Seed of this call's mask: fixed, or a fresh one per call when ``fixed_mask=False``."""
        if self.fixed_mask:
            return self.stream_seed(0)
        with _calls_lock:
            self._calls += 1
            call = self._calls
        return _random.derive_seed(self.stream_seed(0), call)

    def random_count(self, n, D):   # the mask
        return n * D

    def _op_args(self, n, D, w):
        return w.reshape(-1, n, D), self.mask_seed(), self.p

    def get_extra_state(self):
        return {"seed": self.seed, "calls": self._calls}

    def set_extra_state(self, state):
        seed, calls = check_seed(_saved(state, "seed"), "the state_dict's seed"), state.get("calls", 0)
        if isinstance(calls, bool) or not isinstance(calls, int) or calls < 0:
            raise ValueError(f"the state_dict's mask call count must be a non-negative int, got {calls!r}")
        self.seed, self._calls = seed, calls
