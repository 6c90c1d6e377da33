"""Triton kernels for the padding family (reference: ``tinyrecon/functions/padding.py``).

Both functions are GEMMs whose operands are x and y cut into blocks of one width:

    duplicated_padding  (W = ones(p, q) kron B):  y[:, i1*s + i2] = (sum_j1 x[:, j1*t : (j1+1)*t]) @ B^T
    duplicated_diagonal (W = eye(p, q) kron B):   y[:, i1*s + i2] = x[:, i1*t : (i1+1)*t] @ B^T  (0 for i1 >= q)

``_blocked_mm`` computes both, and both input gradients: GEMM row ``m`` is batch row ``m // G``,
block ``g = m % G`` (G = 1 for duplicated_padding, one row per diagonal block otherwise); its input
is the sum of ``IN_BLOCKS`` input blocks from block g, its result written to ``OUT_BLOCKS`` output
blocks from block g. ``_blocked_mm_grad``: the weight gradient ``dY_rows^T @ X_rows``, rows alike.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import ops
from ._common import (BUILD_CONFIGS, acc_type, autotune, bias_stride, build_grid, build_tile, inner_dtype, mixed_precision,
                      split_sum)

# Under the interpreter only the first config runs: small tiles, so tests cross tile edges.
_MM_CONFIGS = [triton.Config({"BM": 16, "BR": 16, "BK": 16}, num_warps=1)] + [
    triton.Config({"BM": bm, "BR": br, "BK": bk}, num_warps=w, num_stages=st)
    # the operands are fp32 (block sums): 128-row tiles take 8 warps, 128 x 128 spills even so (ptxas -v)
    for bm, br, bk, w, st in [(64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3),
                              (32, 32, 64, 4, 4), (128, 32, 64, 8, 4)]]
_GRAD_CONFIGS = [triton.Config({"BS": 16, "BT": 16, "BM": 16}, num_warps=1)] + [
    triton.Config({"BS": bs, "BT": bt, "BM": bm}, num_warps=w, num_stages=st)
    for bs, bt, bm, w, st in [(64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3),
                              (32, 32, 64, 4, 4), (128, 128, 32, 8, 3)]]
_KRON, _TINYBIG, _DIAG = 0, 1, 2


@triton.jit
def _block_sum(ptr, stride_m, stride_k, b, g, row_ok, k, K, BLOCKS, VALID, ACC: tl.constexpr):
    """Rows ``(b, g)``, columns ``k`` of ``sum_{j < BLOCKS} block g + j`` (width K); 0 where g >= VALID."""
    ok = (row_ok & (g < VALID))[:, None] & (k < K)[None, :]
    total = tl.zeros((b.shape[0], k.shape[0]), dtype=ACC)
    for j in range(0, BLOCKS):
        cols = (g + j)[:, None] * K + k[None, :]
        total += tl.load(ptr + b[:, None] * stride_m + cols * stride_k, mask=ok, other=0.0).to(ACC)
    return total


@autotune(_MM_CONFIGS, key=["ROWS", "K", "R", "IN_BLOCKS", "OUT_BLOCKS", "HAS_BIAS", "ACC", "PREC"], bucket=["ROWS"])
@triton.jit
def _blocked_mm(IN, s_ic, s_im, s_ik, M, s_mc, s_mk, s_mr, BIAS, s_bias, OUT, s_oc, s_om,
                ROWS, G, K, R, IN_BLOCKS, IN_VALID, OUT_BLOCKS, CHANNELS,
                HAS_BIAS: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    """OUT[c, m//G, (m%G + i)*R + r] = sum_c' (row-block sum of IN[c']) @ M[c'] (+ bias), i < OUT_BLOCKS.

    Channels c' = pid_c .. pid_c + CHANNELS - 1 (1 for the forward, IN's channel stride 0; C for the
    input gradient); grid (tiles of ROWS * tiles of R, channels). The block sum stays fp32 into the
    dot (TF32 for half types): in fp16 a sum of many blocks could overflow.
    """
    tiles_m = tl.cdiv(ROWS, BM)
    pid_m, pid_r, pid_c = tl.program_id(0) % tiles_m, tl.program_id(0) // tiles_m, tl.program_id(1)
    m = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    r = pid_r.to(tl.int64) * BR + tl.arange(0, BR)
    b, g = m // G, m % G
    row_ok, r_ok = m < ROWS, r < R
    acc = tl.zeros((BM, BR), dtype=ACC)
    for cc in range(0, CHANNELS):
        c = pid_c.to(tl.int64) + cc
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            a = _block_sum(IN + c * s_ic, s_im, s_ik, b, g, row_ok, k, K, IN_BLOCKS, IN_VALID, ACC)
            mt = tl.load(M + c * s_mc + k[:, None] * s_mk + r[None, :] * s_mr,
                         mask=(k < K)[:, None] & r_ok[None, :], other=0.0)
            acc = tl.dot(a, mt.to(ACC), acc, input_precision=PREC, out_dtype=acc.dtype)
    base = OUT + pid_c.to(tl.int64) * s_oc + b[:, None] * s_om
    ok = row_ok[:, None] & r_ok[None, :]
    for i in range(0, OUT_BLOCKS):
        cols = (g + i)[:, None] * R + r[None, :]
        out = acc
        if HAS_BIAS:
            out += tl.load(BIAS + cols * s_bias, mask=ok, other=0.0).to(ACC)
        tl.store(base + cols, out.to(OUT.dtype.element_ty), mask=ok)


@autotune(_GRAD_CONFIGS, key=["ROWS", "S", "T", "DY_BLOCKS", "X_BLOCKS", "ACC", "PREC"], bucket=["ROWS"])
@triton.jit
def _blocked_mm_grad(DY, s_dc, s_dm, s_dk, X, s_xm, s_xk, GB, ROWS, G, S, T, DY_BLOCKS, X_BLOCKS, SPLIT_M, QC,
                     ACC: tl.constexpr, PREC: tl.constexpr,
                     BS: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr):
    """GB[split, c] (S x T) = sum over this split's rows m of (row-block sum of DY[c])^T (sum of this
    split's X blocks), in fp32. Grid (tiles of S * tiles of T, splits, C); split z takes row blocks
    z % SPLIT_M, + SPLIT_M, ... and X blocks [z // SPLIT_M * QC, + QC), so a small batch fills the GPU.
    """
    tiles_s = tl.cdiv(S, BS)
    pid_s, pid_t = tl.program_id(0) % tiles_s, tl.program_id(0) // tiles_s
    split, c = tl.program_id(1), tl.program_id(2).to(tl.int64)
    x_lo = (split // SPLIT_M) * QC
    x_blocks = tl.minimum(QC, X_BLOCKS - x_lo)
    i = pid_s.to(tl.int64) * BS + tl.arange(0, BS)
    j = pid_t.to(tl.int64) * BT + tl.arange(0, BT)
    acc = tl.zeros((BS, BT), dtype=ACC)
    for m0 in range((split % SPLIT_M) * BM, ROWS, SPLIT_M * BM):
        m = m0 + tl.arange(0, BM).to(tl.int64)
        b, g, row_ok = m // G, m % G, m < ROWS
        dy = _block_sum(DY + c * s_dc, s_dm, s_dk, b, g, row_ok, i, S, DY_BLOCKS, G, ACC)
        x = _block_sum(X + x_lo.to(tl.int64) * T * s_xk, s_xm, s_xk, b, g, row_ok, j, T, x_blocks, G, ACC)
        acc = tl.dot(tl.trans(dy), x, acc, input_precision=PREC, out_dtype=ACC)
    tl.store(GB + (split * tl.num_programs(2) + c) * S * T + i[:, None] * T + j[None, :], acc,
             mask=(i < S)[:, None] & (j < T)[None, :])


@autotune(BUILD_CONFIGS, key=["n", "D", "MODE"])
@triton.jit
def _build(B, s_bc, s_bs, s_bt, W, n, D, s, t, MODE: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
    """W[c] (n x D, contiguous) of one padding function, zeros included, in one pass."""
    c, i, j, ok = build_tile(n, D, BI, BJ)
    if MODE == 1:   # tinyBIG: vec(B) tiled, W[i, j] = vec(B)[(i*D + j) % (s*t)]
        f = (i * D + j) % (s * t)
        src, keep = f // t * s_bs + f % t * s_bt, ok
    else:
        src = (i % s) * s_bs + (j % t) * s_bt
        keep = ok & ((i // s) == (j // t)) if MODE == 2 else ok
    v = tl.load(B + c * s_bc + src, mask=keep, other=0.0)
    tl.store(W + c * n * D + i * D + j, v, mask=ok)


# ---- launchers (plain tensors in, plain tensors out) -------------------------------------------
def _launch_build(B, p, q, mode):
    C, s, t = B.shape
    W = torch.empty(C, p * s, q * t, dtype=B.dtype, device=B.device)
    if W.numel():
        _build[build_grid(p * s, q * t, C)](B, *B.stride(), W, p * s, q * t, s, t, MODE=mode)
    return W


def _launch_mm(inp, in_channel_stride, M, mk_mr, bias, C_out, channels, rows, G, K, R,
               in_blocks, in_valid, out_blocks, width):
    """The shared forward / input-gradient launch; OUT is (C_out, batch, width)."""
    N = inp.shape[-2]
    out = torch.empty(C_out, N, width, dtype=inp.dtype, device=inp.device)
    if out.numel():
        grid = lambda a: (triton.cdiv(rows, a["BM"]) * triton.cdiv(R, a["BR"]), C_out)  # noqa: E731
        _blocked_mm[grid](inp, in_channel_stride, inp.stride(-2), inp.stride(-1), M, M.stride(0), *mk_mr,
                          bias, bias_stride(bias), out, out.stride(0), out.stride(1), rows, G, K, R, in_blocks,
                          in_valid, out_blocks, channels, HAS_BIAS=bias is not None, ACC=acc_type(inp.dtype),
                          PREC=mixed_precision(inp.dtype))
    return out


def _blocks(N, in_blocks, out_blocks, diag):
    """The row addressing of ``_blocked_mm`` from ``in_blocks`` input to ``out_blocks`` output blocks: diagonal,
    one GEMM row per (batch row, output block), whose input block exists below ``in_blocks``; else one per row."""
    if diag:
        return dict(rows=N * out_blocks, G=out_blocks, in_blocks=1, in_valid=in_blocks, out_blocks=1)
    return dict(rows=N, G=1, in_blocks=in_blocks, in_valid=1, out_blocks=out_blocks)


def _forward(x, B, p, q, bias, diag):
    C, s, t = B.shape   # M[c, k, r] = B[c, r, k]
    return _launch_mm(x, 0, B, (B.stride(2), B.stride(1)), bias, C_out=C, channels=1, K=t, R=s, width=p * s,
                      **_blocks(x.shape[0], q, p, diag))


def _grad_x(dy, B, p, q, diag):
    C, s, t = B.shape   # M[c, k, r] = B[c, k, r]
    return _launch_mm(dy, dy.stride(0), B, (B.stride(1), B.stride(2)), None, C_out=1, channels=C, K=s, R=t,
                      width=q * t, **_blocks(dy.shape[1], p, q, diag))[0]


def _grad_B(dy, x, p, q, diag):
    C, N, n = dy.shape
    s, t = n // p, x.shape[1] // q
    k = min(p, q)   # diag: rows (batch row, diagonal block) for the k blocks that exist
    rows, G, dy_blocks, x_blocks = (N * k, k, 1, 1) if diag else (N, 1, p, q)
    split_m, qc, split = split_sum(rows, x_blocks, triton.cdiv(s * t, 64 * 64) * C, x.device)
    part = torch.empty(split, C, s, t, dtype=inner_dtype(x.dtype), device=x.device)
    grid = lambda a: (triton.cdiv(s, a["BS"]) * triton.cdiv(t, a["BT"]), split, C)  # noqa: E731
    _blocked_mm_grad[grid](dy, dy.stride(0), dy.stride(1), dy.stride(2), x, x.stride(0), x.stride(1), part,
                           rows, G, s, t, dy_blocks, x_blocks, split_m, qc, ACC=acc_type(x.dtype),
                           PREC=mixed_precision(x.dtype))
    return part.sum(0).to(x.dtype)


def _build_backward(dW, needs, B, p, q, layout=None):
    C, n, D = dW.shape
    s, t = n // p, D // q
    if layout is None:   # duplicated_diagonal_padding
        dB = torch.diagonal(dW.reshape(C, p, s, q, t), dim1=1, dim2=3).sum(-1)
    elif layout == "tinybig":
        dB = dW.reshape(C, p * q, s * t).sum(1)
    else:
        dB = dW.reshape(C, p, s, q, t).sum((1, 3))
    return (dB.reshape(C, s, t),)


def _apply_backward(diag):
    def backward(dy, needs, x, B, p, q, bias, layout=None):
        return (_grad_x(dy, B, p, q, diag) if needs[0] else None), (_grad_B(dy, x, p, q, diag) if needs[1] else None)
    return backward


ops.implement("duplicated_padding_build", "triton",
              lambda B, p, q, layout: _launch_build(B, p, q, _TINYBIG if layout == "tinybig" else _KRON),
              _build_backward, first_order=False)
ops.implement("duplicated_diagonal_padding_build", "triton", lambda B, p, q: _launch_build(B, p, q, _DIAG),
              _build_backward, first_order=False)
ops.implement("duplicated_padding_apply", "triton",
              lambda x, B, p, q, bias, layout: _forward(x, B, p, q, bias, diag=False), _apply_backward(False))
ops.implement("duplicated_diagonal_padding_apply", "triton",
              lambda x, B, p, q, bias: _forward(x, B, p, q, bias, diag=True), _apply_backward(True))
