"""Kronecker family: hm, lphm, dual_lphm (SPEC.md rows 11-13).

``W = A kron B`` with ``A`` (p x q) and ``B`` (s x t), ``s = n/p``, ``t = D/q``:
hm reads A and B from w; lphm builds ``B = S @ T`` (rank r); dual_lphm also ``A = P @ Q``.
``layout="tinybig"`` reproduces tinyBIG 0.2.1, which computes
``W = reshape(outer(vec(A), vec(B)), n, D)`` instead (equal to A kron B iff s = 1 or q = 1).

Ops (dispatch names): ``kron_build(A1, A2, B1, B2, layout) -> (C, n, D)`` and
``kron_apply(x, A1, A2, B1, B2, bias, layout) -> (C, N, n)``, where ``A = A1 @ A2`` when
``A2`` is given, else ``A = A1`` (likewise B). Triton: ``kernels/kron.py``; CUDA: ``csrc/kron.cu``.
"""
from __future__ import annotations

import math

import torch

from .. import dispatch
from ..base import (LAYOUTS, Reconciliation, add_bias, check_divides, check_rank, close_factor, reference,
                    thin_matmul)


def _factor(F1, F2):
    return F1 if F2 is None else torch.matmul(F1, F2)


@reference
def kron_build(A1, A2, B1, B2, layout: str):
    A, B = _factor(A1, A2), _factor(B1, B2)
    C, p, q = A.shape
    _, s, t = B.shape
    if layout == "kron":   # W[i1*s + i2, j1*t + j2] = A[i1, j1] * B[i2, j2]
        return (A[:, :, None, :, None] * B[:, None, :, None, :]).reshape(C, p * s, q * t)
    return (A.reshape(C, -1, 1) * B.reshape(C, 1, -1)).reshape(C, p * s, q * t)


def _thin(F1, F2):
    """``(left, right)`` with ``F = left @ right`` and ``right`` as thin as it can be (left None: identity).

    Only the right factor touches x, so a rank-r factor (r smaller than F's rows) saves work.
    """
    if F2 is not None and F2.shape[1] < F1.shape[1]:
        return F1, F2
    return None, _factor(F1, F2)


@reference
def kron_apply(x, A1, A2, B1, B2, bias, layout: str):
    if layout == "tinybig":
        A, B = _factor(A1, A2), _factor(B1, B2)
        return tinybig_outer_apply(x, A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1), A.shape[1] * B.shape[1], bias)
    (Al, Ar), (Bl, Br) = _thin(A1, A2), _thin(B1, B2)
    C, q, t = Ar.shape[0], Ar.shape[2], Br.shape[2]
    N = x.shape[0]
    X = x.reshape(N, q, t)
    # y[n, i1, i2] = sum_{j1, j2} A[i1, j1] X[n, j1, j2] B[i2, j2]. The one pass over x contracts
    # it with the thinner of Br (over t) and Ar (over q); the rest works on the small result.
    if Br.shape[1] <= Ar.shape[1]:
        Z = thin_matmul(X.reshape(N * q, t), Br.reshape(-1, t)).reshape(N, q, C, Br.shape[1])
        if Bl is not None:
            Z = torch.einsum("nqcr,csr->nqcs", Z, Bl)
        Y = torch.einsum("nqcs,cpq->cnps", Z, _factor(A1, A2))
    else:
        Z = torch.matmul(Ar.reshape(-1, q), X).reshape(N, C, Ar.shape[1], t)
        if Al is not None:
            Z = torch.einsum("ncrt,cpr->ncpt", Z, Al)
        Y = torch.einsum("ncpt,cst->cnps", Z, _factor(B1, B2))
    return add_bias(Y.reshape(C, N, Y.shape[2] * Y.shape[3]), bias)


def tinybig_outer_apply(x, a, b, n, bias):
    """``x @ W^T`` for tinyBIG's ``W = reshape(outer(a, b), n, D)`` (a: (C, P), b: (C, K)).

    W's rows (length D) and outer's rows (length K) both split into blocks of g = gcd(D, K):
    W block (i, j) is flat block ``f = i*m + j`` (m = D/g), which equals
    ``a[f // k] * (block f % k of b)`` (k = K/g). So contract x's m blocks with b's k blocks
    once (``Z``: N x m x k), then one GEMM with the selector ``G[i, j, v] = a[f // k] [v == f % k]``
    (n x m x k). When s divides q, k = 1 and G is just a reshaped slice pattern of a.
    When that is dearer than a dense GEMM (k close to g or n), build W instead.
    """
    C, K = b.shape
    N, D = x.shape
    g = math.gcd(D, K)
    m, k = D // g, K // g
    if m * k > D or N * D * k + N * n * m * k >= N * n * D:
        W = (a.reshape(C, -1, 1) * b.reshape(C, 1, -1)).reshape(C, n, D)
        return add_bias(torch.matmul(x, W.transpose(1, 2)), bias)
    Z = torch.matmul(x.reshape(N * m, g), b.reshape(C * k, g).T).reshape(N, m, C, k)
    f = torch.arange(n, device=x.device)[:, None] * m + torch.arange(m, device=x.device)
    G = a[:, f // k, None] * torch.nn.functional.one_hot(f % k, k).to(a.dtype)   # (C, n, m, k)
    return add_bias(torch.einsum("nmck,cimk->cni", Z, G), bias)


class _KronBase(Reconciliation):
    """Shared by hm, lphm and dual_lphm: p, q resolution, layout, and the two ops."""

    def __init__(self, name, p=None, q=None, layout="kron", **kwargs):
        super().__init__(name, **kwargs)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.p, self.q, self.layout = p, q, layout

    def pq(self, n: int, D: int) -> tuple[int, int]:
        """(p, q) for this layer; ``None`` picks the largest divisor at most isqrt (SPEC.md)."""
        p = close_factor(n) if self.p is None else self.p
        q = close_factor(D) if self.q is None else self.q
        check_divides("p", p, "n", n)
        check_divides("q", q, "D", D)
        return p, q

    def _factors(self, n, D, w):
        """(A1, A2, B1, B2) views into w of shape (C, l)."""
        raise NotImplementedError

    def _build(self, n, D, w, backend):
        op = dispatch.get("kron_build", w.device.type, backend)
        return op(*self._factors(n, D, w), self.layout)

    def _apply_flat(self, x, w, n, bias, backend):
        op = dispatch.get("kron_apply", x.device.type, backend)
        return op(x, *self._factors(n, D=x.shape[-1], w=w), bias, self.layout)

    def extra_repr(self):
        return f"name={self.name!r}, p={self.p}, q={self.q}, layout={self.layout!r}"


def _split(w, *shapes):
    """Consecutive slices of w (C, l) reshaped to (C, *shape) each."""
    sizes = [a * b for a, b in shapes]
    return [part.reshape(w.shape[0], *shape) for part, shape in zip(torch.split(w, sizes, dim=1), shapes)]


class hm_reconciliation(_KronBase):
    """W = A kron B; w = [vec(A) (p*q), vec(B) (s*t)]."""

    def __init__(self, name="hypercomplex_multiplication_reconciliation", p=None, q=None, layout="kron", **kwargs):
        super().__init__(name, p, q, layout, **kwargs)

    def calculate_l(self, n, D):
        p, q = self.pq(n, D)
        return p * q + (n // p) * (D // q)

    def l_formula(self, n, D):
        p, q = self.pq(n, D)
        return f"p*q + s*t = {p}*{q} + {n // p}*{D // q} = {self.calculate_l(n, D)}"

    def _factors(self, n, D, w):
        p, q = self.pq(n, D)
        A, B = _split(w, (p, q), (n // p, D // q))
        return A, None, B, None


class lphm_reconciliation(_KronBase):
    """W = A kron (S @ T); w = [vec(A) (p*q), vec(S) (s*r), vec(T) (r*t)]."""

    def __init__(self, name="lphm_reconciliation", p=None, q=None, r=2, layout="kron", **kwargs):
        super().__init__(name, p, q, layout, **kwargs)
        self.r = check_rank(r)

    def calculate_l(self, n, D):
        p, q = self.pq(n, D)
        return p * q + self.r * (n // p + D // q)

    def l_formula(self, n, D):
        p, q = self.pq(n, D)
        return f"p*q + r*(s+t) = {p}*{q} + {self.r}*({n // p}+{D // q}) = {self.calculate_l(n, D)}"

    def _factors(self, n, D, w):
        p, q = self.pq(n, D)
        A, S, T = _split(w, (p, q), (n // p, self.r), (self.r, D // q))
        return A, None, S, T

    def extra_repr(self):
        return super().extra_repr() + f", r={self.r}"


class dual_lphm_reconciliation(_KronBase):
    """W = (P @ Q) kron (S @ T); w = [vec(P) (p*r), vec(Q) (r*q), vec(S) (s*r), vec(T) (r*t)]."""

    def __init__(self, name="dual_lphm_reconciliation", p=None, q=None, r=2, layout="kron", **kwargs):
        super().__init__(name, p, q, layout, **kwargs)
        self.r = check_rank(r)

    def calculate_l(self, n, D):
        p, q = self.pq(n, D)
        return self.r * (p + q + n // p + D // q)

    def l_formula(self, n, D):
        p, q = self.pq(n, D)
        return f"r*(p+q+s+t) = {self.r}*({p}+{q}+{n // p}+{D // q}) = {self.calculate_l(n, D)}"

    def _factors(self, n, D, w):
        p, q = self.pq(n, D)
        r = self.r
        P, Q, S, T = _split(w, (p, r), (r, q), (n // p, r), (r, D // q))
        return P, Q, S, T

    def extra_repr(self):
        return super().extra_repr() + f", r={self.r}"
