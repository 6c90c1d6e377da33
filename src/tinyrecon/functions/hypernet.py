"""Hypernet family: hypernet and random_matrix_hypernet (docs/functions.md, 13 and 15).

hypernet:                ``W = reshape(W2 @ sigmoid(W1 @ w + b1) + b2, n, D)``; W1 (h x l), b1 (h),
                         W2 (n*D x h), b2 (n*D) N(0, 1): frozen and regenerated from the seed when
                         ``static=True``; trainable parameters (created by ``setup(n, D)``) otherwise.
random_matrix_hypernet:  ``W = reshape(T @ z, n, D)``, ``z = S^T sigmoid(Q P^T w)`` (r);
                         P (l x r), Q (h x r), S (h x r), T (n*D x r) frozen N(0, 1).

W has no structure to exploit: the ops take the vector the big random matrix multiplies (``hvec`` =
sigmoid(W1 w + b1), or ``z``) and generate W slice by slice (the kernels: tile by tile, unstored).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import _random, ops
from ..base import Reconciliation, Seeded, add_bias, check_bool, positive_int, reference

_SLICE = 1 << 22   # random numbers generated per slice of W, to bound memory


def _rows_per_slice(D: int, width: int) -> int:
    return max(1, _SLICE // (D * width))


def _random_linear_build(v, seed_m: int, seed_c, n: int, D: int):
    """``reshape(M @ v^T (+ c), C, n, D)`` for M (n*D x k) = randn(seed_m) and c = randn(seed_c)."""
    C, k = v.shape
    rows = []
    step = _rows_per_slice(D, k)
    for i0 in range(0, n, step):
        i1 = min(n, i0 + step)
        # read only: the cache's own numbers, not a copy (tinyBIG keeps its M as a tensor, too)
        M = _random.randn(seed_m, ((i1 - i0) * D, k), v.device, v.dtype, start=i0 * D * k, shared=True)
        Wi = torch.matmul(v, M.T)
        if seed_c is not None:
            Wi = Wi + _random.randn(seed_c, ((i1 - i0) * D,), v.device, v.dtype, start=i0 * D, shared=True)
        rows.append(Wi.reshape(C, i1 - i0, D))
    return torch.cat(rows, dim=1)


@reference
def hypernet_build(hvec, seed_w2: int, seed_b2: int, n: int, D: int):
    return _random_linear_build(hvec, seed_w2, seed_b2, n, D)


@reference
def hypernet_apply(x, hvec, seed_w2: int, seed_b2: int, n: int, bias):
    W = _random_linear_build(hvec, seed_w2, seed_b2, n, x.shape[1])
    return add_bias(torch.matmul(x, W.transpose(1, 2)), bias)


@reference
def random_matrix_hypernet_build(z, seed_t: int, n: int, D: int):
    return _random_linear_build(z, seed_t, None, n, D)


@reference
def random_matrix_hypernet_apply(x, z, seed_t: int, n: int, bias):
    W = _random_linear_build(z, seed_t, None, n, x.shape[1])
    return add_bias(torch.matmul(x, W.transpose(1, 2)), bias)


for _ref in (hypernet_build, hypernet_apply, random_matrix_hypernet_build, random_matrix_hypernet_apply):
    ops.implement(_ref.__name__, "torch", _ref)


class hypernet_reconciliation(Seeded, Reconciliation):
    """W = reshape(W2 @ sigmoid(W1 @ w + b1) + b2, n, D); l is the constructor's ``l``.

    ``static=False`` trains the hypernet: call ``setup(n, D)`` before building the optimizer
    (``ReconciledLinear`` does; tinyBIG 0.2.1 created the parameters after it, so they were never
    trained). ``net``: your own module mapping w (C, l) to (C, n*D), used instead of the random one.
    """
    number = 13
    examples = {(4, 6): dict(l=5, hidden_dim=3, seed=1), (9, 20): dict(l=5, hidden_dim=6, seed=3)}
    bench_args = dict(seed=0)
    op = "hypernet"
    repr_args = ("l", "hidden_dim", "static", "seed")

    def __init__(self, name="hypernet_reconciliation", l=64, hidden_dim=128, static=True, net=None,
                 seed=None, **kwargs):
        super().__init__(name, **kwargs)
        self.l, self.hidden_dim = positive_int("l", l), positive_int("hidden_dim", hidden_dim)
        self.static = check_bool("static", static)
        self._init_seed(seed)
        self.net = net
        self._setup_for = None

    def calculate_l(self, n=None, D=None):
        return self.l

    def l_formula(self, n, D):
        return f"l = {self.l} (the constructor's l)"

    def first_layer(self, like: torch.Tensor):
        """The frozen (W1, b1), generated from the seed."""
        W1 = _random.randn(self.stream_seed(0), (self.hidden_dim, self.l), like.device, like.dtype)
        b1 = _random.randn(self.stream_seed(1), (self.hidden_dim,), like.device, like.dtype)
        return W1, b1

    def setup(self, n: int, D: int) -> None:
        """Create the trainable hypernet (``static=False``), initialised to the seed's matrices."""
        if self.static or self.net is not None or self._setup_for == (n, D):
            return
        _random.check_cost(self.random_count(n, D), f"hypernet_reconciliation.setup(n={n}, D={D}) "
                           f"with hidden_dim={self.hidden_dim}")
        W1, b1 = self.first_layer(torch.empty(0))
        net = nn.Sequential(nn.Linear(self.l, self.hidden_dim), nn.Sigmoid(), nn.Linear(self.hidden_dim, n * D))
        with torch.no_grad():
            net[0].weight.copy_(W1)
            net[0].bias.copy_(b1)
            net[2].weight.copy_(_random.randn(self.stream_seed(2), (n * D, self.hidden_dim)))
            net[2].bias.copy_(_random.randn(self.stream_seed(3), (n * D,)))
        self.net, self._setup_for = net, (n, D)

    def _trainable(self, n, D, w):
        if self.net is None and not self.static:
            raise RuntimeError("hypernet_reconciliation(static=False) trains its hypernet: call "
                               f"setup(n={n}, D={D}) before building the optimizer")
        if self._setup_for is not None and self._setup_for != (n, D):
            raise ValueError(f"this hypernet was set up for (n, D) = {self._setup_for}, not ({n}, {D}): its "
                             "trainable last layer has n*D outputs; use one function per layer shape")
        param = next(self.net.parameters(), None) if self.net is not None else None
        if param is not None and (param.dtype != w.dtype or param.device != w.device):
            raise TypeError(f"w is {w.dtype} on {w.device} but the hypernet's parameters are {param.dtype} on "
                            f"{param.device}; move the function with .to(...) (ReconciledLinear does it for you)")
        return self.net

    @property
    def build_when_small(self) -> bool:   # a trainable hypernet's apply is already its build and a GEMM
        return self.static and self.net is None

    @reference   # fp16/bf16: in fp32, rounded once
    def _hvec(self, w):
        W1, b1 = self.first_layer(w)
        return torch.sigmoid(torch.matmul(w, W1.T) + b1)

    def random_count(self, n, D):   # (W1, b1), then (W2, b2) of n*D rows
        return self.hidden_dim * (self.l + 1) + n * D * (self.hidden_dim + 1)

    def _build(self, n, D, w, backend):
        net = self._trainable(n, D, w)
        if net is not None:
            out = net(w)
            if out.shape[-1] != n * D:
                raise ValueError(f"the hypernet maps w to {out.shape[-1]} values per channel, not n*D = {n}*{D}")
            return out.reshape(-1, n, D)
        return super()._build(n, D, w, backend)

    def _apply_flat(self, x, w, n, bias, backend):
        if self._trainable(n, x.shape[-1], w) is not None:
            return self._dense_apply(x, w, n, bias, backend)
        return super()._apply_flat(x, w, n, bias, backend)

    def _op_args(self, n, D, w):
        return self._hvec(w), self.stream_seed(2), self.stream_seed(3), n


class random_matrix_hypernet_reconciliation(Seeded, Reconciliation):
    """W = reshape(((sigmoid((w @ P) @ Q^T) @ S) @ T^T), n, D); P, Q, S, T frozen N(0, 1)."""
    number = 15
    examples = {(4, 6): dict(r=2, l=5, hidden_dim=3, seed=1), (9, 20): dict(r=2, l=5, hidden_dim=6, seed=3)}
    bench_args = dict(r=5, seed=0)
    op = "random_matrix_hypernet"
    build_when_small = True
    repr_args = ("r", "l", "hidden_dim", "seed")

    def __init__(self, name="random_matrix_hypernet_reconciliation", r=2, l=64, hidden_dim=128, seed=None,
                 **kwargs):
        super().__init__(name, **kwargs)
        self.r, self.l = positive_int("r", r), positive_int("l", l)
        self.hidden_dim = positive_int("hidden_dim", hidden_dim)
        self._init_seed(seed)

    def calculate_l(self, n=None, D=None):
        return self.l

    def l_formula(self, n, D):
        return f"l = {self.l} (the constructor's l)"

    def small_matrices(self, like: torch.Tensor):
        """The frozen (P, Q, S), generated from the seed."""
        shapes = ((self.l, self.r), (self.hidden_dim, self.r), (self.hidden_dim, self.r))
        return [_random.randn(self.stream_seed(i), s, like.device, like.dtype) for i, s in enumerate(shapes)]

    @reference   # fp16/bf16: the frozen matrices and the chain in fp32 (they are tiny), rounded once
    def _z(self, w):
        P, Q, S = self.small_matrices(w)
        return torch.matmul(torch.sigmoid(torch.matmul(torch.matmul(w, P), Q.T)), S)

    def random_count(self, n, D):   # P, Q, S, then T of n*D rows
        return self.r * (self.l + 2 * self.hidden_dim + n * D)

    def _op_args(self, n, D, w):
        return self._z(w), self.stream_seed(3), n
