"""Low-rank family: lorr and random_matrix_adaption (docs/functions.md, 9 and 14)."""
from __future__ import annotations

import torch

from .. import _random, ops
from ..base import TORCH_X_OPS, Reconciliation, Seeded, add_bias, channel_matmul, factor_pass, positive_int, reference


@reference
def lorr_build(A, B):
    return channel_matmul(A, B)


@reference
def lorr_apply(x, A, B, bias, x_ops=TORCH_X_OPS):
    C, n, r = A.shape
    U = factor_pass(x[None], B.reshape(C * r, -1), x_ops).reshape(C, r, x.shape[0]).mT   # (C, N, r)
    return add_bias(torch.matmul(U, A.transpose(1, 2)), bias)


def random_matrix_adaption_matrices(seed_a: int, seed_b: int, n: int, D: int, r: int, like: torch.Tensor,
                                    shared: bool = True):
    """The frozen A (n x r) and B (D x r); ``shared``: maybe the cache's own tensors (``_random.randn``)."""
    A = _random.randn(seed_a, (n, r), device=like.device, dtype=like.dtype, shared=shared)
    B = _random.randn(seed_b, (D, r), device=like.device, dtype=like.dtype, shared=shared)
    return A, B


@reference
def random_matrix_adaption_build(l1, l2, seed_a: int, seed_b: int, D: int):
    A, B = random_matrix_adaption_matrices(seed_a, seed_b, l1.shape[1], D, l2.shape[1], l1)
    return torch.matmul(l1[:, :, None] * A * l2[:, None, :], B.T)


@reference
def random_matrix_adaption_apply(x, l1, l2, seed_a: int, seed_b: int, bias, x_ops=TORCH_X_OPS):
    A, B = random_matrix_adaption_matrices(seed_a, seed_b, l1.shape[1], x.shape[1], l2.shape[1], l1)
    U = factor_pass(x[None], B.T, x_ops)[0].T * l2[:, None, :]   # (C, N, r): the rank-r bottleneck
    return add_bias(torch.matmul(U, A.T) * l1[:, None, :], bias)


for _ref in (lorr_build, lorr_apply, random_matrix_adaption_build, random_matrix_adaption_apply):
    ops.implement(_ref.__name__, "torch", _ref)


class lorr_reconciliation(Reconciliation):
    """W = A @ B; w = [vec(A) (n x r), vec(B) (r x D)]; l = r*(n+D)."""
    number = 9
    degree = 2
    examples = {(4, 6): dict(r=1), (9, 20): dict(r=3)}
    bench_args = dict(r=5)
    op = "lorr"
    build_when_small = True
    repr_args = ("r",)

    def __init__(self, name="low_rank_reconciliation", r=2, **kwargs):
        super().__init__(name, **kwargs)
        self.r = positive_int("r", r)

    def calculate_l(self, n, D):
        return self.r * (n + D)

    def l_formula(self, n, D):
        return f"r*(n+D) = {self.r}*({n}+{D}) = {self.calculate_l(n, D)}"

    def _op_args(self, n, D, w):
        A, B = torch.split(w, [n * self.r, self.r * D], dim=1)
        return A.reshape(-1, n, self.r), B.reshape(-1, self.r, D)


class random_matrix_adaption_reconciliation(Seeded, Reconciliation):
    """W = diag(l1) @ A @ diag(l2) @ B^T; w = [l1 (n), l2 (r)]; A (n x r), B (D x r) frozen N(0, 1) from ``seed``."""
    number = 14
    degree = 2
    examples = {(4, 6): dict(r=2, seed=1), (9, 20): dict(r=2, seed=3)}
    bench_args = dict(r=5, seed=0)
    op = "random_matrix_adaption"
    build_when_small = True
    repr_args = ("r", "seed")

    def __init__(self, name="random_matrix_adaption_reconciliation", r=2, seed=None, **kwargs):
        super().__init__(name, **kwargs)
        self.r = positive_int("r", r)
        self._init_seed(seed)

    def calculate_l(self, n, D):
        return n + self.r

    def l_formula(self, n, D):
        return f"n + r = {n} + {self.r} = {self.calculate_l(n, D)}"

    def _op_args(self, n, D, w):
        l1, l2 = torch.split(w, [n, self.r], dim=1)
        return l1, l2, self.stream_seed(0), self.stream_seed(1)

    def random_count(self, n, D):   # A and B
        return (n + D) * self.r

    def matrices(self, n, D, device=None, dtype=torch.float32):
        """The frozen (A, B), for inspection and tests."""
        return random_matrix_adaption_matrices(self.stream_seed(0), self.stream_seed(1), n, D, self.r,
                            torch.empty(0, device=device, dtype=dtype), shared=False)
