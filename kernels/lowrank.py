"""Triton kernels for the low-rank family; the spec is ``tinyrecon/functions/lowrank.py``.

The applies are fused: a program keeps the rank-r bottleneck ``x @ B^T`` (lorr) or ``x @ B``
(random_matrix_adaption, whose A and B are generated in registers with ``tl.randn(seed, row*r + col)``)
of its rows in registers and writes only ``y``. Backward passes are GEMMs on rank-r intermediates,
run by one batched GEMM kernel (``bmm``, a custom op differentiable again); RMA's backward
materializes A and B with the same ``tl.randn``, equal to the forward's bit for bit.
"""
import torch
import triton
import triton.language as tl

from .. import dispatch, ops
from ._common import (acc_type, autotune, bias_stride, dot_dtype, fewest_values, inner_dtype, mixed_precision, precision,
                      rank_block)


def _cfg(bm, bn, bk, warps, stages=3):
    return triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=warps, num_stages=stages)


# The first config is the one the interpreter runs: small, so CPU tests stay fast.
_GEMM_CONFIGS = [_cfg(16, 16, 16, 4), _cfg(64, 64, 32, 4), _cfg(128, 64, 32, 4), _cfg(64, 128, 32, 4),
                 _cfg(128, 128, 32, 8), _cfg(32, 32, 64, 4)]
# Fused applies: BN tiles n, BK tiles D; the rank tile is fixed by r.
_FUSED_CONFIGS = [_cfg(16, 16, 32, 4), _cfg(64, 64, 64, 4), _cfg(128, 64, 64, 4), _cfg(64, 32, 128, 4),
                  _cfg(128, 128, 64, 8), _cfg(32, 64, 64, 4)]
_SMEM = 160 * 1024   # a little under sm_80's 163 KB of shared memory per block (sm_90: 227 KB)


def _fits(configs, rp, itemsize):
    """The configs that fit a rank tile of RP: in shared memory, the pipelined tiles of x and of the
    rank factor plus U staged for the second dot; in registers, the tiles a program holds, at most
    128 values per thread (ptxas -v: up to 6 KB of spills per thread at RP = 128 with more)."""
    acc = max(4, itemsize)
    ok = [c for c in configs if (c.kwargs["BM"] + rp) * c.kwargs["BK"] * max(itemsize, 4) * c.num_stages
          + c.kwargs["BM"] * rp * acc <= _SMEM]
    return fewest_values(ok or configs[:1], lambda c: _values(c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"], rp), 128)


def _values(bm, bn, bk, rp):
    return bm * rp + rp * bk + rp * bn + bm * bn + bm * bk


# ---- batched GEMM: out[b] = a[b] @ c[b], any strides (0 broadcasts) ------------------------------
@autotune(_GEMM_CONFIGS, key=["M", "N", "K", "ACC", "DOT", "PREC"], bucket=["M", "N", "K"])   # any may be the batch
@triton.jit
def _bmm_kernel(A, Bm, O, M, N, K, sab, sam, sak, sbb, sbk, sbn, sob, som, son,
                ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    tiles_n = tl.cdiv(N, BN)
    rows = (pid // tiles_n).to(tl.int64) * BM + tl.arange(0, BM)
    cols = (pid % tiles_n).to(tl.int64) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), ACC)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK).to(tl.int64)
        a = tl.load(A + b * sab + rows[:, None] * sam + ks[None, :] * sak,
                    mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        c = tl.load(Bm + b * sbb + ks[:, None] * sbk + cols[None, :] * sbn,
                    mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0)
        acc = tl.dot(a.to(DOT), c.to(DOT), acc, input_precision=PREC, out_dtype=ACC)
    tl.store(O + b * sob + rows[:, None] * som + cols[None, :] * son, acc.to(O.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


@torch.library.custom_op("tinyrecon::triton_bmm", mutates_args=())
def bmm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` for (Bt, M, K) @ (Bt, K, N) in ``dtype``, accumulated in fp32 (fp64 for fp64)."""
    Bt, M, K = a.shape
    N = b.shape[2]
    out = torch.empty(Bt, M, N, dtype=dtype, device=a.device)
    if out.numel():
        grid = lambda META: (triton.cdiv(M, META["BM"]) * triton.cdiv(N, META["BN"]), Bt)  # noqa: E731
        # operands of one half type: its tensor cores; an fp32 operand (an intermediate): fp32 dots
        same = a.dtype == b.dtype
        _bmm_kernel[grid](a, b, out, M, N, K, *a.stride(), *b.stride(), *out.stride(), ACC=acc_type(a.dtype),
                          DOT=dot_dtype(a.dtype) if same else acc_type(a.dtype),
                          PREC=mixed_precision(a.dtype if a.dtype.itemsize <= b.dtype.itemsize else b.dtype))
    return out


@bmm.register_fake
def _(a, b, dtype):
    return a.new_empty(a.shape[0], a.shape[1], b.shape[2], dtype=dtype)


def _bmm_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])


def _bmm_backward(ctx, g):
    # bmm again: the low-rank backward passes, made of bmm, can be differentiated again (create_graph=True)
    a, b = ctx.saved_tensors
    need = ctx.needs_input_grad
    return (bmm(g, b.transpose(1, 2), a.dtype) if need[0] else None,
            bmm(a.transpose(1, 2), g, b.dtype) if need[1] else None, None)


bmm.register_autograd(_bmm_backward, setup_context=_bmm_setup)


# ---- lorr ------------------------------------------------------------------------------------------
ops.implement("lorr_build", "triton", lambda A, B: bmm(A, B, A.dtype),
              lambda dW, needs, A, B: (bmm(dW, B.transpose(1, 2), A.dtype), bmm(A.transpose(1, 2), dW, B.dtype)),
              first_order=False)


@autotune(_FUSED_CONFIGS, key=["N", "D", "n", "RP", "HAS_BIAS", "ACC", "DOT", "PREC", "MPREC"], bucket=["N"],
          prune=lambda cfgs, a: _fits(cfgs, a["RP"], a["X"].element_size()))
@triton.jit
def _lorr_apply_kernel(X, A, Bm, Bias, Y, N, D, n, r, sxm, sxd, sac, sai, sak, sbc, sbk, sbd, s_bias,
                       HAS_BIAS: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                       MPREC: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid, c = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rows = pid.to(tl.int64) * BM + tl.arange(0, BM)
    ks = tl.arange(0, RP)
    u = tl.zeros((BM, RP), ACC)                       # x @ B_c^T for these rows: never stored
    for d0 in range(0, D, BK):
        ds = d0 + tl.arange(0, BK).to(tl.int64)
        xt = tl.load(X + rows[:, None] * sxm + ds[None, :] * sxd,
                     mask=(rows[:, None] < N) & (ds[None, :] < D), other=0.0)
        bt = tl.load(Bm + c * sbc + ks[None, :] * sbk + ds[:, None] * sbd,
                     mask=(ks[None, :] < r) & (ds[:, None] < D), other=0.0)
        u = tl.dot(xt.to(DOT), bt.to(DOT), u, input_precision=PREC, out_dtype=ACC)
    for i0 in range(0, n, BN):
        cols = i0 + tl.arange(0, BN).to(tl.int64)
        at = tl.load(A + c * sac + cols[None, :] * sai + ks[:, None] * sak,
                     mask=(cols[None, :] < n) & (ks[:, None] < r), other=0.0)
        y = tl.dot(u, at.to(ACC), input_precision=MPREC, out_dtype=ACC)   # u: an fp32 sum over D
        if HAS_BIAS:
            y += tl.load(Bias + cols * s_bias, mask=cols < n, other=0.0).to(ACC)[None, :]
        tl.store(Y + (c * N + rows[:, None]) * n + cols[None, :], y.to(Y.dtype.element_ty),
                 mask=(rows[:, None] < N) & (cols[None, :] < n))


def _lorr_apply(x, A, B, bias):
    C, n, r = A.shape
    N, D = x.shape
    y = torch.empty(C, N, n, dtype=x.dtype, device=x.device)
    if y.numel():
        grid = lambda META: (triton.cdiv(N, META["BM"]), C)  # noqa: E731
        _lorr_apply_kernel[grid](x, A, B, bias, y, N, D, n, r, *x.stride(), *A.stride(), *B.stride(),
                                 bias_stride(bias), HAS_BIAS=bias is not None, ACC=acc_type(x.dtype),
                                 DOT=dot_dtype(x.dtype), PREC=precision(x.dtype),
                                 MPREC=mixed_precision(x.dtype), RP=rank_block(r))
    return y


def _lorr_apply_backward(dy, needs, x, A, B, bias):
    C, n, r = A.shape
    N, D = x.shape
    f = inner_dtype(x.dtype)
    xs = x.expand(C, N, D)
    U = bmm(xs, B.transpose(1, 2), f)                        # (C, N, r)
    dU = bmm(dy, A, f)                                       # (C, N, r)
    dA = bmm(dy.transpose(1, 2), U, A.dtype)
    dB = bmm(dU.transpose(1, 2), xs, B.dtype)
    dx = bmm(dU.transpose(0, 1).reshape(1, N, C * r), B.reshape(1, C * r, D), x.dtype)[0]
    return dx, dA, dB


ops.implement("lorr_apply", "triton", _lorr_apply, _lorr_apply_backward, first_order=False)


# ---- random_matrix_adaption ------------------------------------------------------------------------
@triton.jit
def _randn_kernel(O, numel, seed, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(O + offs, tl.randn(seed, offs).to(O.dtype.element_ty), mask=offs < numel)


def _randn(seed: int, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``tl.randn(seed, row*cols + col)`` as a (rows, cols) tensor."""
    out = torch.empty(rows, cols, dtype=dtype, device=device)
    if out.numel():
        _randn_kernel[(triton.cdiv(out.numel(), 1024),)](out, out.numel(), seed, BLOCK=1024)
    return out


randn = dispatch.traced_op("triton_randn", _randn, lambda seed, rows, cols, dtype, device: torch.empty(
    rows, cols, dtype=dtype, device=device))


@triton.jit
def _randn_tile(seed, rows, cols, n_rows, r):
    """Element (rows[i], cols[j]) of the (n_rows x r) matrix tl.randn(seed, row*r + col); 0 outside it."""
    inside = (rows[:, None] < n_rows) & (cols[None, :] < r)
    return tl.where(inside, tl.randn(seed, rows[:, None] * r + cols[None, :]), 0.0)


@autotune(_GEMM_CONFIGS, key=["n", "D", "ACC", "PREC", "RP"],
          prune=lambda cfgs, a: _fits(cfgs, a["RP"], a["W"].element_size()))
@triton.jit
def _random_matrix_adaption_build_kernel(L1, L2, W, C, n, D, r, seed_a, seed_b, sl1c, sl1i, sl2c, sl2k,
                                         ACC: tl.constexpr, PREC: tl.constexpr, RP: tl.constexpr,
                                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(D, BN)
    rows = (pid // tiles_n).to(tl.int64) * BM + tl.arange(0, BM)
    cols = (pid % tiles_n).to(tl.int64) * BN + tl.arange(0, BN)
    ks = tl.arange(0, RP).to(tl.int64)
    a = _randn_tile(seed_a, rows, ks, n, r).to(ACC)                       # A tile (BM, RP)
    bt = tl.trans(_randn_tile(seed_b, cols, ks, D, r)).to(ACC)            # B^T tile (RP, BN)
    for c in range(C):    # A and B are shared by the channels: generate once, use C times
        l2 = tl.load(L2 + c * sl2c + ks * sl2k, mask=ks < r, other=0.0).to(ACC)
        l1 = tl.load(L1 + c * sl1c + rows * sl1i, mask=rows < n, other=0.0).to(ACC)
        w = tl.dot(a * l2[None, :], bt, input_precision=PREC, out_dtype=ACC) * l1[:, None]
        tl.store(W + (tl.cast(c, tl.int64) * n + rows[:, None]) * D + cols[None, :], w.to(W.dtype.element_ty),
                 mask=(rows[:, None] < n) & (cols[None, :] < D))


def _random_matrix_adaption_build(l1, l2, seed_a, seed_b, D):
    (C, n), r = l1.shape, l2.shape[1]
    W = torch.empty(C, n, D, dtype=l1.dtype, device=l1.device)
    if W.numel():
        grid = lambda META: (triton.cdiv(n, META["BM"]) * triton.cdiv(D, META["BN"]),)  # noqa: E731
        _random_matrix_adaption_build_kernel[grid](
            l1, l2, W, C, n, D, r, seed_a, seed_b, *l1.stride(), *l2.stride(), ACC=acc_type(l1.dtype),
            PREC=mixed_precision(l1.dtype), RP=rank_block(r))
    return W


def _lambda_grads(M, A, l1, l2):
    """Gradients of l1, l2 from ``M[c][i, k] = sum_j dW_c[i, j] B[j, k]`` (C, n, r)."""
    P = M * A
    f = P.dtype
    return (P * l2.to(f)[:, None, :]).sum(2), (P * l1.to(f)[:, :, None]).sum(1)


def _random_matrix_adaption_build_backward(dW, needs, l1, l2, seed_a, seed_b, D):
    (C, n), r = l1.shape, l2.shape[1]
    f = inner_dtype(l1.dtype)
    A, B = randn(seed_a, n, r, f, l1.device), randn(seed_b, D, r, f, l1.device)
    M = bmm(dW, B.expand(C, D, r), f)                        # dW_c @ B: (C, n, r)
    return _lambda_grads(M, A, l1, l2)


ops.implement("random_matrix_adaption_build", "triton", _random_matrix_adaption_build,
              _random_matrix_adaption_build_backward, first_order=False)


@autotune(_FUSED_CONFIGS, key=["N", "D", "n", "RP", "HAS_BIAS", "ACC", "PREC"], bucket=["N"],
          prune=lambda cfgs, a: _fits(cfgs, a["RP"], a["X"].element_size()))
@triton.jit
def _random_matrix_adaption_apply_kernel(X, L1, L2, Bias, Y, C, N, D, n, r, seed_a, seed_b, sxm, sxd, sl1c, sl1i,
                                         sl2c, sl2k, s_bias, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                                         PREC: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                                         BK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    ks = tl.arange(0, RP).to(tl.int64)
    u = tl.zeros((BM, RP), ACC)                       # x @ B for these rows: shared by the channels
    for d0 in range(0, D, BK):
        ds = d0 + tl.arange(0, BK).to(tl.int64)
        xt = tl.load(X + rows[:, None] * sxm + ds[None, :] * sxd,
                     mask=(rows[:, None] < N) & (ds[None, :] < D), other=0.0)
        u = tl.dot(xt.to(ACC), _randn_tile(seed_b, ds, ks, D, r).to(ACC), u, input_precision=PREC, out_dtype=ACC)
    for i0 in range(0, n, BN):
        cols = i0 + tl.arange(0, BN).to(tl.int64)
        at = tl.trans(_randn_tile(seed_a, cols, ks, n, r)).to(ACC)      # A^T tile (RP, BN)
        if HAS_BIAS:
            b = tl.load(Bias + cols * s_bias, mask=cols < n, other=0.0).to(ACC)
        for c in range(C):
            l2 = tl.load(L2 + c * sl2c + ks * sl2k, mask=ks < r, other=0.0).to(ACC)
            l1 = tl.load(L1 + c * sl1c + cols * sl1i, mask=cols < n, other=0.0).to(ACC)
            y = tl.dot(u * l2[None, :], at, input_precision=PREC, out_dtype=ACC) * l1[None, :]
            if HAS_BIAS:
                y += b[None, :]
            tl.store(Y + (tl.cast(c, tl.int64) * N + rows[:, None]) * n + cols[None, :], y.to(Y.dtype.element_ty),
                     mask=(rows[:, None] < N) & (cols[None, :] < n))


def _random_matrix_adaption_apply(x, l1, l2, seed_a, seed_b, bias):
    (C, n), r = l1.shape, l2.shape[1]
    N, D = x.shape
    y = torch.empty(C, N, n, dtype=x.dtype, device=x.device)
    if y.numel():
        grid = lambda META: (triton.cdiv(N, META["BM"]),)  # noqa: E731
        _random_matrix_adaption_apply_kernel[grid](
            x, l1, l2, bias, y, C, N, D, n, r, seed_a, seed_b, *x.stride(), *l1.stride(), *l2.stride(),
            bias_stride(bias), HAS_BIAS=bias is not None, ACC=acc_type(x.dtype), PREC=mixed_precision(x.dtype),
            RP=rank_block(r))
    return y


def _random_matrix_adaption_apply_backward(dy, needs, x, l1, l2, seed_a, seed_b, bias):
    (C, n), r = l1.shape, l2.shape[1]
    N, D = x.shape
    f = inner_dtype(x.dtype)
    A, B = randn(seed_a, n, r, f, x.device), randn(seed_b, D, r, f, x.device)
    U = bmm(x[None], B[None], f)[0]                                          # x @ B: (N, r)
    M = bmm(dy.transpose(1, 2), U.expand(C, N, r), f)                        # dy_c^T @ U: (C, n, r)
    dl1, dl2 = _lambda_grads(M, A, l1, l2)
    G = bmm(dy, l1.to(f)[:, :, None] * A, f)                                 # dy_c @ diag(l1_c) A
    dU = (G * l2.to(f)[:, None, :]).sum(0)                                   # (N, r)
    dx = bmm(dU[None], B.T[None], x.dtype)[0]
    return dx, dl1, dl2


ops.implement("random_matrix_adaption_apply", "triton", _random_matrix_adaption_apply,
              _random_matrix_adaption_apply_backward, first_order=False)
