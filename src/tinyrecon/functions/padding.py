"""Padding family: duplicated_padding and duplicated_diagonal_padding (docs/functions.md, 7-8)."""
from __future__ import annotations

import torch

from .. import ops
from ..base import LAYOUTS, TORCH_X_OPS, Reconciliation, add_bias, check_divides, factor_pass, positive_int, reference
from .kron import kron_apply, tinybig_outer_apply


@reference
def duplicated_padding_build(B, p: int, q: int, layout: str):
    C, s, t = B.shape
    if layout == "kron":
        return B.repeat(1, p, q)
    # tinyBIG 0.2.1: reshape(outer(ones(p*q), vec(B)), n, D), i.e. vec(B) tiled p*q times.
    return B.reshape(C, -1).repeat(1, p * q).reshape(C, p * s, q * t)


@reference
def duplicated_padding_apply(x, B, p: int, q: int, bias, layout: str, x_ops=TORCH_X_OPS):
    C = B.shape[0]
    if layout == "tinybig":
        a = torch.ones(C, p * q, dtype=B.dtype, device=B.device)
        return tinybig_outer_apply(x, a, B.reshape(C, -1), p * B.shape[1], bias)
    # ones(p, q) = ones(p, 1) @ ones(1, q): a rank-1 left factor, so x's q blocks are summed in the
    # one pass and every block row repeats the same small GEMM.
    return kron_apply(x, B.new_ones(C, p, 1), B.new_ones(C, 1, q), B, None, bias, "kron", x_ops)


@reference
def duplicated_diagonal_padding_build(B, p: int, q: int):
    C, s, t = B.shape
    eye = torch.eye(p, q, dtype=B.dtype, device=B.device)
    return (eye[None, :, None, :, None] * B[:, None, :, None, :]).reshape(C, p * s, q * t)


@reference
def duplicated_diagonal_padding_apply(x, B, p: int, q: int, bias, x_ops=TORCH_X_OPS):
    C, s, t = B.shape
    N = x.shape[0]
    k = min(p, q)   # blocks on the diagonal; rows past them are zero
    Y = factor_pass(x.reshape(N, q, t)[:, :k], B.reshape(C * s, t), x_ops).reshape(N, C, s, k).permute(1, 0, 3, 2)
    if k < p:
        Y = torch.cat([Y, Y.new_zeros(C, N, p - k, s)], dim=2)
    return add_bias(Y.reshape(C, N, p * s), bias)


ops.implement("duplicated_padding_build", "torch", duplicated_padding_build)
ops.implement("duplicated_padding_apply", "torch", duplicated_padding_apply, tinybig=True)
ops.implement("duplicated_diagonal_padding_build", "torch", duplicated_diagonal_padding_build)
ops.implement("duplicated_diagonal_padding_apply", "torch", duplicated_diagonal_padding_apply)


class duplicated_padding_reconciliation(Reconciliation):
    """W = ones(p, q) kron reshape(w, s, t); l = s*t. ``q=None`` means q = p."""
    number = 7
    degree = 1
    examples = {(4, 6): dict(p=2), (9, 20): dict(p=3, q=4)}
    op = "duplicated_padding"
    build_when_small = True
    repr_args = ("p", "q", "layout")

    def __init__(self, name="duplicated_padding_reconciliation", p=2, q=None, layout="kron", **kwargs):
        super().__init__(name, **kwargs)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        p = positive_int("p", p)
        self.p, self.q, self.layout = p, (p if q is None else positive_int("q", q, none_ok=True)), layout

    def pq(self, n, D):
        check_divides("p", self.p, "n", n)
        check_divides("q", self.q, "D", D)
        return self.p, self.q

    def calculate_l(self, n, D):
        p, q = self.pq(n, D)
        return (n // p) * (D // q)

    def l_formula(self, n, D):
        p, q = self.pq(n, D)
        return f"s*t = {n // p}*{D // q} = {self.calculate_l(n, D)}"

    def _op_args(self, n, D, w):
        p, q = self.pq(n, D)
        return w.reshape(w.shape[0], n // p, D // q), p, q


class duplicated_diagonal_padding_reconciliation(duplicated_padding_reconciliation):
    """W = eye(p, q) kron reshape(w, s, t); l = s*t. tinyBIG 0.2.1 runs it only with p = q = n (the
    same W), as a sparse COO tensor; here W is dense, and ``layout`` is accepted for symmetry only."""
    number = 8
    op = "duplicated_diagonal_padding"

    def __init__(self, name="duplicated_diagonal_padding_reconciliation", p=2, q=None, layout="kron", **kwargs):
        super().__init__(name, p, q, layout, **kwargs)
