"""Triton kernels for masking_reconciliation (reference: ``tinyrecon/functions/masking.py``).

``W = M * w`` with ``M[i, j] = tl.rand(seed, i*D + j) < p``. Every kernel regenerates the mask of
the tile it touches (no n x D mask exists) and loads no dropped entry of w.

    apply:   y  = x @ (M*w)^T + bias
    grad x:  dx = sum_c dy_c @ (M*w_c)        (one launch, channels summed in the program)
    grad w:  dw = M * (dy^T @ x)              (the mask applied to the GEMM's tile on store)
    build:   W  = M * w;  its gradient dw = M * dW is the same kernel
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import ops
from ._common import BUILD_CONFIGS, acc_type, autotune, bias_stride, build_grid, build_tile, dot_dtype, precision

_MM_CONFIGS = [triton.Config({"BM": 16, "BR": 16, "BK": 16}, num_warps=1)] + [
    triton.Config({"BM": bm, "BR": br, "BK": bk}, num_warps=w, num_stages=st)
    for bm, br, bk, w, st in [(64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3),
                              (128, 128, 32, 8, 3), (128, 128, 64, 8, 3)]]


@triton.jit
def _kept(seed, p, i, j, D):
    """M[i, j] for int64 index blocks i, j: the reference's ``_random.rand(seed, (n, D)) < p``."""
    return tl.rand(seed, i * D + j) < p


@autotune(BUILD_CONFIGS, key=["n", "D"])
@triton.jit
def _build(Wp, s_c, s_n, s_d, OUT, n, D, seed, p, BI: tl.constexpr, BJ: tl.constexpr):
    """OUT[c] (n x D, contiguous) = M * W[c]."""
    c, i, j, ok = build_tile(n, D, BI, BJ)
    v = tl.load(Wp + c * s_c + i * s_n + j * s_d, mask=ok & _kept(seed, p, i, j, D), other=0.0)
    tl.store(OUT + c * n * D + i * D + j, v, mask=ok)


@autotune(_MM_CONFIGS, key=["ROWS", "K", "R", "TRANS", "CHANNELS", "HAS_BIAS", "ACC", "DOT", "PREC"], bucket=["ROWS"])
@triton.jit
def _masked_mm(A, s_ac, s_am, s_ak, Wp, s_wc, s_wk, s_wr, BIAS, s_bias, OUT, s_oc, s_om,
               ROWS, K, R, CHANNELS, seed, p,
               TRANS: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
               BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    """OUT[c, m, r] = sum_{c'} sum_k A[c', m, k] * (M*w)[c'] at (k, r) (+ bias[r]), channels
    c' = pid_c .. pid_c + CHANNELS - 1. TRANS: w's (k, r) is w[r, k] (the apply) rather than w[k, r].
    Grid (tiles of ROWS * tiles of R, channels): R may be D, so its tiles go in x (limit 2^31).
    """
    tiles_m = tl.cdiv(ROWS, BM)
    pid_m, pid_r, pid_c = tl.program_id(0) % tiles_m, tl.program_id(0) // tiles_m, tl.program_id(1)
    m = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    r = pid_r.to(tl.int64) * BR + tl.arange(0, BR)
    row_ok, r_ok = m < ROWS, r < R
    D = K if TRANS else R
    acc = tl.zeros((BM, BR), dtype=ACC)
    for cc in range(0, CHANNELS):
        c = pid_c.to(tl.int64) + cc
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK).to(tl.int64)
            a = tl.load(A + c * s_ac + m[:, None] * s_am + k[None, :] * s_ak,
                        mask=row_ok[:, None] & (k < K)[None, :], other=0.0)
            if TRANS:
                kept = _kept(seed, p, r[None, :], k[:, None], D)
            else:
                kept = _kept(seed, p, k[:, None], r[None, :], D)
            wt = tl.load(Wp + c * s_wc + k[:, None] * s_wk + r[None, :] * s_wr,
                         mask=(k < K)[:, None] & r_ok[None, :] & kept, other=0.0)
            acc = tl.dot(a.to(DOT), wt.to(DOT), acc, input_precision=PREC, out_dtype=ACC)
    ok = row_ok[:, None] & r_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + r * s_bias, mask=r_ok, other=0.0).to(ACC)[None, :]
    tl.store(OUT + pid_c.to(tl.int64) * s_oc + m[:, None] * s_om + r[None, :], acc.to(OUT.dtype.element_ty), mask=ok)


@autotune(_MM_CONFIGS, key=["N", "n", "D", "ACC", "DOT", "PREC"], bucket=["N"])
@triton.jit
def _grad_w(DY, s_dc, s_dm, s_dn, X, s_xm, s_xd, GW, N, n, D, seed, p,
            ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
            BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    """GW[c] (n x D) = M * (DY[c]^T @ X); BM tiles n, BR tiles D, BK the batch; grid (tiles of n * D, C)."""
    tiles_i = tl.cdiv(n, BM)
    pid_i, pid_j, c = tl.program_id(0) % tiles_i, tl.program_id(0) // tiles_i, tl.program_id(1).to(tl.int64)
    i = pid_i.to(tl.int64) * BM + tl.arange(0, BM)
    j = pid_j.to(tl.int64) * BR + tl.arange(0, BR)
    acc = tl.zeros((BM, BR), dtype=ACC)
    for m0 in range(0, N, BK):
        m = m0 + tl.arange(0, BK).to(tl.int64)
        dy = tl.load(DY + c * s_dc + m[None, :] * s_dm + i[:, None] * s_dn,
                     mask=(m < N)[None, :] & (i < n)[:, None], other=0.0)
        x = tl.load(X + m[:, None] * s_xm + j[None, :] * s_xd, mask=(m < N)[:, None] & (j < D)[None, :], other=0.0)
        acc = tl.dot(dy.to(DOT), x.to(DOT), acc, input_precision=PREC, out_dtype=ACC)
    ok = (i < n)[:, None] & (j < D)[None, :]
    acc = tl.where(_kept(seed, p, i[:, None], j[None, :], D), acc, 0.0)
    tl.store(GW + c * n * D + i[:, None] * D + j[None, :], acc.to(GW.dtype.element_ty), mask=ok)


def _flags(dtype):
    return dict(ACC=acc_type(dtype), DOT=dot_dtype(dtype), PREC=precision(dtype))


def _build_launch(w, seed, p):
    C, n, D = w.shape
    out = torch.empty(C, n, D, dtype=w.dtype, device=w.device)
    if out.numel():
        _build[build_grid(n, D, C)](w, *w.stride(), out, n, D, seed, p)
    return out


def _mm(a, a_channel_stride, w, w_kr, bias, C_out, channels, K, R, trans, seed, p):
    N = a.shape[-2]
    out = torch.empty(C_out, N, R, dtype=a.dtype, device=a.device)
    if out.numel():
        grid = lambda m: (triton.cdiv(N, m["BM"]) * triton.cdiv(R, m["BR"]), C_out)  # noqa: E731
        _masked_mm[grid](a, a_channel_stride, a.stride(-2), a.stride(-1), w, w.stride(0), *w_kr, bias, bias_stride(bias),
                         out, out.stride(0), out.stride(1), N, K, R, channels, seed, p, TRANS=trans,
                         HAS_BIAS=bias is not None, **_flags(a.dtype))
    return out


def _apply(x, w, seed, p, bias):
    C, n, D = w.shape
    return _mm(x, 0, w, (w.stride(2), w.stride(1)), bias, C, 1, D, n, True, seed, p)


def _grad_x(dy, w, seed, p):
    C, n, D = w.shape
    return _mm(dy, dy.stride(0), w, (w.stride(1), w.stride(2)), None, 1, C, n, D, False, seed, p)[0]


def _launch_grad_w(dy, x, seed, p):
    C, N, n = dy.shape
    D = x.shape[1]
    gw = torch.empty(C, n, D, dtype=x.dtype, device=x.device)
    if gw.numel():
        grid = lambda a: (triton.cdiv(n, a["BM"]) * triton.cdiv(D, a["BR"]), C)  # noqa: E731
        _grad_w[grid](dy, *dy.stride(), x, *x.stride(), gw, N, n, D, seed, p, **_flags(x.dtype))
    return gw


def _apply_backward(dy, needs, x, w, seed, p, bias):
    return (_grad_x(dy, w, seed, p) if needs[0] else None), (_launch_grad_w(dy, x, seed, p) if needs[1] else None)


# The build's gradient is the build again (the mask times dW): differentiable, by the same op.
build = ops.implement("masking_build", "triton", _build_launch,
                      lambda dW, needs, w, seed, p: (build(dW, seed, p),), first_order=False)
ops.implement("masking_apply", "triton", _apply, _apply_backward)
