"""Kronecker family: hm, lphm, dual_lphm (docs/functions.md, 10-12).

``W = A kron B`` with ``A`` (p x q) and ``B`` (s x t), ``s = n/p``, ``t = D/q``: hm reads A and B
from w; lphm builds ``B = S @ T`` (rank r); dual_lphm also ``A = P @ Q``. The ops take
``A = A1 @ A2`` when A2 is given, else A1 (likewise B). ``layout="tinybig"`` reproduces tinyBIG
0.2.1's ``W = reshape(outer(vec(A), vec(B)), n, D)`` (equal to A kron B iff s = 1 or q = 1).
"""
from __future__ import annotations

import math

import torch

from .. import ops
from ..base import (LAYOUTS, TORCH_X_OPS, Reconciliation, add_bias, channel_matmul, check_divides,
                    close_factor, positive_int, reference, traceable)


def _factor(F1, F2):
    return F1 if F2 is None else channel_matmul(F1, F2)


@reference
def kron_build(A1, A2, B1, B2, layout: str):
    A, B = _factor(A1, A2), _factor(B1, B2)
    C, p, q = A.shape
    _, s, t = B.shape
    if layout == "kron":   # W[i1*s + i2, j1*t + j2] = A[i1, j1] * B[i2, j2]
        return (A[:, :, None, :, None] * B[:, None, :, None, :]).reshape(C, p * s, q * t)
    return (A.reshape(C, -1, 1) * B.reshape(C, 1, -1)).reshape(C, p * s, q * t)


def _thin(F1, F2):
    """``(left, right)`` with ``F = left @ right`` and ``right``, which touches x, thinnest (left None: identity)."""
    if F2 is not None and F2.shape[1] < F1.shape[1]:
        return F1, F2
    return None, _factor(F1, F2)


class _KronCore(torch.autograd.Function):
    """``core[b] = Ar @ X[b] @ Br^T`` for x (N, q, t): the only part of a Kronecker apply that reads x
    (through ``x_ops``).

    When the factors need gradients the forward keeps ``U[b] = Ar @ X[b]`` for ``dBr`` and ``V[b] =
    Br @ X[b]^T`` for ``dAr`` (small for thin factors; extra outputs, as torch.func requires), so the
    backward writes dX without reading x again; otherwise it forms U unless V is less than half its
    size. A double backward, torch.func, or a gradient not planned for take torch's ops on x.
    """
    generate_vmap_rule = True

    @staticmethod
    def forward(x, Ar, Br, keep_u, keep_v, x_ops):
        N, q, t = x.shape
        rA, rB = Ar.shape[0], Br.shape[0]
        use_u = keep_u or (not keep_v and rA * t <= 2 * rB * q)
        U, V = traceable(x_ops).passes(x, Ar, Br, use_u, keep_v or not use_u)
        if use_u:
            core = torch.matmul(U, Br.T)
        else:
            core = torch.mm(Ar, V.view(rB * N, q).T).view(rA, rB, N).permute(2, 0, 1)
        return core, U if keep_u else x.new_empty(0), V if keep_v else x.new_empty(0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, Ar, Br, keep_u, keep_v, x_ops = inputs
        _, U, V = output
        ctx.mark_non_differentiable(U, V)
        ctx.save_for_backward(x, U if keep_u else None, V if keep_v else None, Ar, Br)
        ctx.expand = x_ops.expand

    @staticmethod
    def backward(ctx, dcore, _dU, _dV):
        x, U, V, Ar, Br = ctx.saved_tensors
        N, q, t = x.shape
        rA, rB = Ar.shape[0], Br.shape[0]
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        plain = torch.is_grad_enabled() or torch._C._are_functorch_transforms_active()
        dx = dAr = dBr = None
        if need_a:   # sum over n and b of dcore[n, a, b] V[b, n, :]
            if plain or V is None:   # (x may be a bfloat16 x the CPU kernels read as is)
                dAr = torch.matmul(torch.matmul(dcore, Br), x.to(dcore.dtype).transpose(1, 2)).sum(0)
            else:
                dAr = torch.mm(dcore.permute(1, 2, 0).reshape(rA, rB * N), V.view(rB * N, q))
        if need_b:   # sum over n and a of dcore[n, a, b] U[n, a, :]
            if plain or U is None:
                dBr = torch.matmul(dcore.transpose(1, 2), torch.matmul(Ar, x.to(dcore.dtype))).sum(0)
            else:
                dBr = torch.mm(dcore.reshape(N * rA, rB).T, U.view(N * rA, t))
        if need_x:   # via G (N, rA, t), small
            G = torch.matmul(dcore, Br)
            dx = torch.matmul(Ar.T, G) if plain else ctx.expand(G, Ar)
        return dx, dAr, dBr, None, None, None


@reference
def kron_apply(x, A1, A2, B1, B2, bias, layout: str, x_ops=TORCH_X_OPS):
    if layout == "tinybig":
        A, B = _factor(A1, A2), _factor(B1, B2)
        return tinybig_outer_apply(x, A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1), A.shape[1] * B.shape[1], bias)
    # y[n] = A X[n] B^T with A = Al @ Ar, B = Bl @ Br: the core Ar X[n] Br^T is the one pass over
    # x, for all C channels at once (the off-diagonal channel blocks are small and dropped).
    (Al, Ar), (Bl, Br) = _thin(A1, A2), _thin(B1, B2)
    C, rA, q = Ar.shape
    _, rB, t = Br.shape
    N = x.shape[0]
    Ar2, Br2 = Ar.reshape(C * rA, q), Br.reshape(C * rB, t)
    grad = torch.is_grad_enabled()
    core = _KronCore.apply(x.reshape(N, q, t), Ar2, Br2, grad and Br2.requires_grad, grad and Ar2.requires_grad,
                          x_ops)[0]
    core = core.view(N, C, rA, C, rB).diagonal(dim1=1, dim2=3).permute(3, 0, 1, 2)   # (C, N, rA, rB)
    # matmul, not einsum: its output layout is fixed, so torch.compile's traced reshape stays valid
    # (a broadcast product's strides can differ between fake and real tensors).
    Y = core if Al is None else torch.matmul(Al[:, None], core)                      # (C, N, p, rB)
    Y = Y if Bl is None else torch.matmul(Y, Bl[:, None].transpose(2, 3))            # (C, N, p, s)
    return add_bias(Y.reshape(C, N, Y.shape[2] * Y.shape[3]), bias)


ops.implement("kron_build", "torch", kron_build)
ops.implement("kron_apply", "torch", kron_apply, tinybig=True)


def tinybig_outer_apply(x, a, b, n, bias):
    """``x @ W^T`` for tinyBIG's ``W = reshape(outer(a, b), n, D)`` (a: (C, P), b: (C, K)).

    With g = gcd(D, K), m = D/g and k = K/g, W's block (i, j) of width g is flat block f = i*m + j,
    ``a[f // k] * (block f % k of b)``: x's m blocks are contracted with b's k blocks once (Z), then
    one GEMM with the selector ``G[i, j, v] = a[f // k] [v == f % k]``. Where that is dearer than a
    dense GEMM, W is built instead.
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
    """Shared by hm, lphm and dual_lphm: p, q, layout, and the ops (``_op_args``: views (A1, A2, B1, B2) of w)."""
    op = "kron"
    build_when_small = True
    repr_args = ("p", "q", "layout")

    def __init__(self, name, p=None, q=None, layout="kron", **kwargs):
        super().__init__(name, **kwargs)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.p, self.q, self.layout = positive_int("p", p, none_ok=True), positive_int("q", q, none_ok=True), layout

    def pq(self, n: int, D: int) -> tuple[int, int]:
        """(p, q) for this layer; ``None`` picks the largest divisor at most isqrt (docs/functions.md)."""
        p = close_factor(n) if self.p is None else self.p
        q = close_factor(D) if self.q is None else self.q
        check_divides("p", p, "n", n)
        check_divides("q", q, "D", D)
        return p, q


def _split(w, *shapes):
    """Consecutive slices of w (C, l) reshaped to (C, *shape) each."""
    sizes = [a * b for a, b in shapes]
    return [part.reshape(w.shape[0], *shape) for part, shape in zip(torch.split(w, sizes, dim=1), shapes)]


class hm_reconciliation(_KronBase):
    """W = A kron B; w = [vec(A) (p*q), vec(B) (s*t)]."""
    number = 10
    degree = 2
    examples = {(4, 6): dict(p=2, q=3), (9, 20): dict(p=3, q=2)}

    def __init__(self, name="hypercomplex_multiplication_reconciliation", p=None, q=None, layout="kron", **kwargs):
        super().__init__(name, p, q, layout, **kwargs)

    def calculate_l(self, n, D):
        p, q = self.pq(n, D)
        return p * q + (n // p) * (D // q)

    def l_formula(self, n, D):
        p, q = self.pq(n, D)
        return f"p*q + s*t = {p}*{q} + {n // p}*{D // q} = {self.calculate_l(n, D)}"

    def _op_args(self, n, D, w):
        p, q = self.pq(n, D)
        A, B = _split(w, (p, q), (n // p, D // q))
        return A, None, B, None


class lphm_reconciliation(_KronBase):
    """W = A kron (S @ T); w = [vec(A) (p*q), vec(S) (s*r), vec(T) (r*t)]."""
    number = 11
    degree = 3
    examples = {(4, 6): dict(p=2, q=3, r=1), (9, 20): dict(p=3, q=4, r=2)}
    bench_args = dict(r=5)
    repr_args = ("p", "q", "layout", "r")

    def __init__(self, name="lphm_reconciliation", p=None, q=None, r=2, layout="kron", **kwargs):
        super().__init__(name, p, q, layout, **kwargs)
        self.r = positive_int("r", r)

    def calculate_l(self, n, D):
        p, q = self.pq(n, D)
        return p * q + self.r * (n // p + D // q)

    def l_formula(self, n, D):
        p, q = self.pq(n, D)
        return f"p*q + r*(s+t) = {p}*{q} + {self.r}*({n // p}+{D // q}) = {self.calculate_l(n, D)}"

    def _op_args(self, n, D, w):
        p, q = self.pq(n, D)
        A, S, T = _split(w, (p, q), (n // p, self.r), (self.r, D // q))
        return A, None, S, T


class dual_lphm_reconciliation(_KronBase):
    """W = (P @ Q) kron (S @ T); w = [vec(P) (p*r), vec(Q) (r*q), vec(S) (s*r), vec(T) (r*t)]."""
    number = 12
    degree = 4
    examples, bench_args = lphm_reconciliation.examples, lphm_reconciliation.bench_args
    repr_args = ("p", "q", "layout", "r")

    def __init__(self, name="dual_lphm_reconciliation", p=None, q=None, r=2, layout="kron", **kwargs):
        super().__init__(name, p, q, layout, **kwargs)
        self.r = positive_int("r", r)

    def calculate_l(self, n, D):
        p, q = self.pq(n, D)
        return self.r * (p + q + n // p + D // q)

    def l_formula(self, n, D):
        p, q = self.pq(n, D)
        return f"r*(p+q+s+t) = {self.r}*({p}+{q}+{n // p}+{D // q}) = {self.calculate_l(n, D)}"

    def _op_args(self, n, D, w):
        p, q = self.pq(n, D)
        r = self.r
        P, Q, S, T = _split(w, (p, r), (r, q), (n // p, r), (r, D // q))
        return P, Q, S, T
