"""Triton kernels for the Kronecker family; the spec is ``tinyrecon/functions/kron.py``.

With x viewed as X (N, q, t), ``y[m, i1*s + i2] = sum_j1 A[i1, j1] (X_j1 @ B^T)[m, i2]``. A
``_kron_mm`` program owns rows m and blocks of i1 and i2; for each j1 it contracts X_j1 with B
(``tl.dot``; through the rank-r factor when B = S @ T) and adds ``A[i1, j1] * Z`` to its accumulator,
so x is read once per program. ``dx = dy @ W`` is the same kernel with ``A^T, B^T`` (strides), the
channels summed. ``_kron_grad`` gives ``dB[i2, j2] = sum_{m, j1} (sum_i1 A[i1, j1] dy[m, i1, i2])
X[m, j1, j2]`` without dW, and dA with the factors' roles swapped; the chain rule to low-rank
factors is torch matmuls, and so is the build's gradient.
"""

import torch
import triton
import triton.language as tl

from .. import ops
from ._common import (acc_type, autotune, bias_stride, build_grid, build_tile, dot_dtype, fewest_values, inner_dtype,
                      mixed_precision, precision, rank_block, split_sum)


def _cfg(bp, bm, bs, bt, warps, stages):
    return triton.Config({"BP": bp, "BM": bm, "BS": bs, "BT": bt}, num_warps=warps, num_stages=stages)


# First config: the interpreter's small tiles (tests cross every edge); the others fit sm_90 without spills (ptxas -v).
_MM_CONFIGS = [_cfg(2, 16, 16, 16, 1, 1)] + [
    _cfg(bp, bm, bs, bt, w, 2) for bp, bm, bs, bt, w in [(2, 32, 32, 32, 4), (4, 32, 32, 32, 4), (8, 32, 32, 32, 4),
                                                         (8, 16, 32, 32, 4), (2, 64, 64, 32, 8), (4, 32, 64, 32, 8),
                                                         (8, 64, 16, 32, 4), (16, 32, 16, 32, 4)]]   # BS=16: s <= 16
_GRAD_CONFIGS = [triton.Config({"BPG": 16, "BM": 16, "BS": 16, "BT": 16}, num_warps=1)] + [
    triton.Config({"BPG": bp, "BM": bm, "BS": bs, "BT": bt}, num_warps=4, num_stages=3)
    # BPG=4 with a 64 x 64 tile spills (ptxas -v)
    for bp, bm, bs, bt in [(4, 32, 32, 32), (2, 64, 32, 64), (2, 32, 64, 64), (8, 32, 32, 32)]]
_BUILD_CONFIGS = [triton.Config({"BI": 16, "BJ": 32}, num_warps=1)] + [   # 4096 elements per program spill
    triton.Config({"BI": bi, "BJ": bj}, num_warps=w) for bi, bj, w in [(16, 128, 4), (8, 256, 4), (32, 128, 8),
                                                                        (64, 64, 8)]]


@triton.jit
def _entry(F1, s1c, s1i, s1k, F2, s2c, s2k, s2j, c, i, j, ok, R, LOWRANK: tl.constexpr, ACC: tl.constexpr):
    """F[c, i, j] for index tensors i, j (0 where not ok), with F = F1 @ F2 (rank R) when LOWRANK."""
    if LOWRANK:
        v = tl.zeros(ok.shape, ACC)
        for k in range(0, R):
            v += (tl.load(F1 + c * s1c + i * s1i + k * s1k, mask=ok, other=0.0).to(ACC)
                  * tl.load(F2 + c * s2c + k * s2k + j * s2j, mask=ok, other=0.0).to(ACC))
        return v
    return tl.load(F1 + c * s1c + i * s1i + j * s1k, mask=ok, other=0.0).to(ACC)


@autotune(_BUILD_CONFIGS, key=["n", "D", "TINYBIG", "A_LR", "B_LR", "ACC"])
@triton.jit
def _kron_build(A1, sa1c, sa1i, sa1k, A2, sa2c, sa2k, sa2j, B1, sb1c, sb1i, sb1k, B2, sb2c, sb2k, sb2j,
                W, n, D, Q, S, T, RA, RB, TINYBIG: tl.constexpr, A_LR: tl.constexpr, B_LR: tl.constexpr,
                ACC: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
    """W[c] (n x D, contiguous) = A kron B, or tinyBIG's reshape(outer(vec A, vec B)), in one pass."""
    c, i, j, ok = build_tile(n, D, BI, BJ)
    if TINYBIG:   # W[i, j] = vec(A)[f // (s*t)] * vec(B)[f % (s*t)], f = i*D + j
        f = i * D + j
        fa, fb = f // (S * T), f % (S * T)
        ia, ja, ib, jb = fa // Q, fa % Q, fb // T, fb % T
    else:
        ia, ja, ib, jb = i // S, j // T, i % S, j % T
    a = _entry(A1, sa1c, sa1i, sa1k, A2, sa2c, sa2k, sa2j, c, ia, ja, ok, RA, A_LR, ACC)
    b = _entry(B1, sb1c, sb1i, sb1k, B2, sb2c, sb2k, sb2j, c, ib, jb, ok, RB, B_LR, ACC)
    tl.store(W + c * n * D + i * D + j, (a * b).to(W.dtype.element_ty), mask=ok)


def _mm_values(c, rpa, rpb):
    """fp32 values a ``_kron_mm`` program holds: the accumulator, Z, S^T and the P tile, x's and B's tiles."""
    bp, bm, bs, bt = (c.kwargs[k] for k in ("BP", "BM", "BS", "BT"))
    return bp * bm * bs + bm * max(rpb, bs) + rpb * bs + bp * rpa + bm * bt + bt * max(rpb, bs)


# At most 100 values per thread: (BP, BM, BS) = (2, 64, 64) with rank tiles of 128 holds 121 and spills 2 KB.
@autotune(_MM_CONFIGS, key=["M", "P", "Q", "S", "T", "CH", "A_LR", "B_LR", "HAS_BIAS", "ACC", "DOT", "PREC",
                             "MPREC", "RPA", "RPB"],
          bucket=["M"], prune=lambda cfgs, a: fewest_values(cfgs, lambda c: _mm_values(c, a["RPA"], a["RPB"]), 100))
@triton.jit
def _kron_mm(X, sxc, sxm, sxd, A1, sa1c, sa1i, sa1k, A2, sa2c, sa2k, sa2j,
             B1, sb1c, sb1i, sb1k, B2, sb2c, sb2k, sb2j, BIAS, sbias, Y, syc, sym, syi,
             M, P, Q, S, T, RA, RB, CH, A_LR: tl.constexpr, B_LR: tl.constexpr, HAS_BIAS: tl.constexpr,
             ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, MPREC: tl.constexpr, RPA: tl.constexpr,
             RPB: tl.constexpr, BP: tl.constexpr, BM: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr):
    """Y[pid_c, m, i1*S + i2] = sum over CH channels c of sum_{j1, j2} A[c,i1,j1] X[c,m,j1*T+j2] B[c,i2,j2] (+ bias).

    The forward runs CH = 1 (X's channel stride 0), the input gradient one output with CH = C.
    A = A1 @ A2 when A_LR, else A1; likewise B. Grid (tiles of M * tiles of (P, S), channels).
    """
    tiles_m = tl.cdiv(M, BM)
    pid_m, pid_ps, pid_c = tl.program_id(0) % tiles_m, tl.program_id(0) // tiles_m, tl.program_id(1)
    tiles_s = tl.cdiv(S, BS)
    i1 = (pid_ps // tiles_s).to(tl.int64) * BP + tl.arange(0, BP)
    i2 = (pid_ps % tiles_s).to(tl.int64) * BS + tl.arange(0, BS)
    m = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    i1_ok, i2_ok, m_ok = i1 < P, i2 < S, m < M
    ka, kb = tl.arange(0, RPA), tl.arange(0, RPB)
    acc = tl.zeros((BP, BM, BS), ACC)   # y[m, i1*S + i2] as (i1, m, i2)
    for cc in range(0, CH):
        c = pid_c.to(tl.int64) + cc
        xc = X + c * sxc + m[:, None] * sxm
        if B_LR:   # S^T (RPB x BS) and the P tile (BP x RPA) serve every j1
            st = tl.load(B1 + c * sb1c + i2[None, :] * sb1i + kb[:, None] * sb1k,
                         mask=i2_ok[None, :] & (kb < RB)[:, None], other=0.0).to(ACC)
        if A_LR:
            pa = tl.load(A1 + c * sa1c + i1[:, None] * sa1i + ka[None, :] * sa1k,
                         mask=i1_ok[:, None] & (ka < RA)[None, :], other=0.0).to(ACC)
        for j1 in range(0, Q):
            # Z = X_j1 @ B^T for these rows; with B = S @ T as (X_j1 @ T^T) @ S^T (rank r in between).
            if B_LR:
                z = tl.zeros((BM, RPB), ACC)
            else:
                z = tl.zeros((BM, BS), ACC)
            for t0 in range(0, T, BT):
                j2 = t0 + tl.arange(0, BT)
                col = j1 * T + j2.to(tl.int64)
                xt = tl.load(xc + col[None, :] * sxd, mask=m_ok[:, None] & (j2 < T)[None, :], other=0.0)
                if B_LR:
                    bt = tl.load(B2 + c * sb2c + kb[None, :] * sb2k + j2[:, None] * sb2j,
                                 mask=(kb < RB)[None, :] & (j2 < T)[:, None], other=0.0)
                else:
                    bt = tl.load(B1 + c * sb1c + i2[None, :] * sb1i + j2[:, None] * sb1k,
                                 mask=i2_ok[None, :] & (j2 < T)[:, None], other=0.0)
                z = tl.dot(xt.to(DOT), bt.to(DOT), z, input_precision=PREC, out_dtype=z.dtype)
            if B_LR:   # z is an fp32 sum: TF32 for half types (see mixed_precision)
                z = tl.dot(z, st, input_precision=MPREC, out_dtype=ACC)
            if A_LR:
                qa = tl.load(A2 + c * sa2c + ka * sa2k + j1 * sa2j, mask=ka < RA, other=0.0).to(ACC)
                a = tl.sum(pa * qa[None, :], axis=1)
            else:
                a = tl.load(A1 + c * sa1c + i1 * sa1i + j1 * sa1k, mask=i1_ok, other=0.0).to(ACC)
            acc += a[:, None, None] * z[None, :, :]
    cols = i1[:, None, None] * S + i2[None, None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + cols * sbias, mask=i1_ok[:, None, None] & i2_ok[None, None, :], other=0.0).to(ACC)
    ok = i1_ok[:, None, None] & m_ok[None, :, None] & i2_ok[None, None, :]
    tl.store(Y + pid_c.to(tl.int64) * syc + m[None, :, None] * sym + cols * syi, acc.to(Y.dtype.element_ty), mask=ok)


@autotune(_GRAD_CONFIGS, key=["M", "P", "Q", "S", "T", "ACC", "PREC"], bucket=["M"])
@triton.jit
def _kron_grad(DY, sdc, sdm, sd1, sd2, X, sxm, sx1, sx2, F, sfc, sf1, sf2, G, M, P, Q, S, T, C, SPLIT_M, QC,
               ACC: tl.constexpr, PREC: tl.constexpr,
               BPG: tl.constexpr, BM: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr):
    """G[split, c] (S x T) = sum over the rows m and the j1 of this split of
    (sum_i1 F[c,i1,j1] DY[c,m,i1,:])^T X[m,j1,:], for DY (C, M, P, S), X (M, Q, T), F (C, P, Q).

    Split z takes row blocks z % SPLIT_M, + SPLIT_M, ... and j1 in [z // SPLIT_M * QC, + QC), so a
    small batch fills the GPU. The sum over i1 and the dot are fp32 (TF32 for half types): fp16 could overflow.
    """
    pid_st, split, c = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    tiles_t = tl.cdiv(T, BT)
    i2 = (pid_st // tiles_t).to(tl.int64) * BS + tl.arange(0, BS)
    j2 = (pid_st % tiles_t).to(tl.int64) * BT + tl.arange(0, BT)
    i2_ok, j2_ok = i2 < S, j2 < T
    q_lo = (split // SPLIT_M) * QC
    q_hi = tl.minimum(Q, q_lo + QC)
    acc = tl.zeros((BS, BT), ACC)
    for m0 in range((split % SPLIT_M) * BM, M, SPLIT_M * BM):
        m = m0 + tl.arange(0, BM).to(tl.int64)
        m_ok = m < M
        dyc = DY + c * sdc + m[None, :, None] * sdm + i2[None, None, :] * sd2
        fj = F + c * sfc + q_lo * sf2                      # column j1 of F_c,
        xj = X + m[:, None] * sxm + j2[None, :] * sx2 + q_lo.to(tl.int64) * sx1   # and of X: advance with j1
        for j1 in range(q_lo, q_hi):
            g = tl.zeros((BM, BS), ACC)   # dy_c contracted with column j1 of F, for these rows
            for p0 in range(0, P, BPG):
                i1 = p0 + tl.arange(0, BPG).to(tl.int64)
                f = tl.load(fj + i1 * sf1, mask=i1 < P, other=0.0).to(ACC)
                d = tl.load(dyc + i1[:, None, None] * sd1,
                            mask=(i1 < P)[:, None, None] & m_ok[None, :, None] & i2_ok[None, None, :], other=0.0)
                g += tl.sum(f[:, None, None] * d.to(ACC), axis=0)
            xt = tl.load(xj, mask=m_ok[:, None] & j2_ok[None, :], other=0.0)
            fj += sf2
            xj += sx1
            acc = tl.dot(tl.trans(g), xt.to(ACC), acc, input_precision=PREC, out_dtype=acc.dtype)
    tl.store(G + ((split * C + c) * S + i2[:, None]) * T + j2[None, :], acc, mask=i2_ok[:, None] & j2_ok[None, :])


# ---- launchers (plain tensors in, plain tensors out) -------------------------------------------
def _strides(F):
    """F's three strides, or zeros for an absent factor (the kernel does not read it)."""
    return F.stride() if F is not None else (0, 0, 0)


def _launch_build(A1, A2, B1, B2, tinybig):
    C, P, RA = A1.shape
    S, RB = B1.shape[1:]
    Q = RA if A2 is None else A2.shape[2]
    T = RB if B2 is None else B2.shape[2]
    W = torch.empty(C, P * S, Q * T, dtype=A1.dtype, device=A1.device)
    if not W.numel():
        return W
    _kron_build[build_grid(P * S, Q * T, C)](A1, *A1.stride(), A2, *_strides(A2), B1, *B1.stride(), B2, *_strides(B2),
                      W, P * S, Q * T, Q, S, T, RA, RB, TINYBIG=tinybig, A_LR=A2 is not None,
                      B_LR=B2 is not None, ACC=acc_type(A1.dtype))
    return W


def _launch_mm(inp, A1, A2, B1, B2, bias, C_out, CH):
    """(C_out, M, P*S) for inp (C, M, Q*T) (channel stride 0 for a shared x): ``_kron_mm``."""
    P, RA = A1.shape[1:]
    S, RB = B1.shape[1:]
    Q = RA if A2 is None else A2.shape[2]
    T = RB if B2 is None else B2.shape[2]
    M = inp.shape[1]
    out = torch.empty(C_out, M, P * S, dtype=inp.dtype, device=inp.device)
    if out.numel():
        def grid(a):
            return triton.cdiv(M, a["BM"]) * triton.cdiv(P, a["BP"]) * triton.cdiv(S, a["BS"]), C_out
        _kron_mm[grid](inp, *inp.stride(), A1, *A1.stride(), A2, *_strides(A2), B1, *B1.stride(),
                       B2, *_strides(B2), bias, bias_stride(bias), out, *out.stride(),
                       M, P, Q, S, T, RA, RB, CH,
                       A_LR=A2 is not None, B_LR=B2 is not None, HAS_BIAS=bias is not None,
                       ACC=acc_type(inp.dtype), DOT=dot_dtype(inp.dtype), PREC=precision(inp.dtype),
                       MPREC=mixed_precision(inp.dtype),   # rank tiles only for factored A, B (unused else)
                       RPA=rank_block(RA) if A2 is not None else 16, RPB=rank_block(RB) if B2 is not None else 16)
    return out


def _launch_grad(dy4, x3, F):
    """(C, S, T), accumulated in fp32 (fp64): sum_{m, j1} (sum_i1 F[c,i1,j1] dy4[c,m,i1,:])^T x3[m,j1,:]."""
    C, M, P, S = dy4.shape
    Q, T = x3.shape[1:]
    split_m, qc, split = split_sum(M, Q, triton.cdiv(S * T, 32 * 64) * C, x3.device)
    part = torch.empty(split, C, S, T, dtype=inner_dtype(x3.dtype), device=x3.device)
    grid = lambda a: (triton.cdiv(S, a["BS"]) * triton.cdiv(T, a["BT"]), split, C)  # noqa: E731
    _kron_grad[grid](dy4, *dy4.stride(), x3, *x3.stride(), F, *F.stride(), part, M, P, Q, S, T, C, split_m, qc,
                     ACC=acc_type(x3.dtype), PREC=mixed_precision(x3.dtype))
    return part.sum(0)


def _t(F):
    return None if F is None else F.transpose(1, 2)


def _grad_x(dy, A1, A2, B1, B2):
    """dx = dy @ W = sum_c dy_c @ (A_c^T kron B_c^T)^T: the forward with transposed factors, channels summed."""
    A1t, A2t = (_t(A1), None) if A2 is None else (_t(A2), _t(A1))
    B1t, B2t = (_t(B1), None) if B2 is None else (_t(B2), _t(B1))
    return _launch_mm(dy, A1t, A2t, B1t, B2t, None, 1, dy.shape[0])[0]


def _grad_factor(dy, x, F, of_a):
    """For ``y = x @ (A kron B)^T``: dB given F = A (p, q), or dA given F = B (s, t) (of_a), in fp32 (fp64)."""
    rows, cols = F.shape[1:]
    if of_a:   # the same sum with the two factors' roles swapped
        return _launch_grad(dy.unflatten(2, (-1, rows)).transpose(2, 3), x.unflatten(1, (-1, cols)).transpose(1, 2), F)
    return _launch_grad(dy.unflatten(2, (rows, -1)), x.unflatten(1, (cols, -1)), F)


def _factor(F1, F2, dtype):
    F1 = F1.to(dtype)
    return F1 if F2 is None else torch.matmul(F1, F2.to(dtype))


def _chain(dF, F1, F2, need1, need2):
    """Gradients of F1 and F2 from dF, the gradient of F = F1 @ F2 (or F = F1)."""
    if F2 is None:
        return (dF if need1 else None), None
    g1 = torch.matmul(dF, F2.to(dF.dtype).transpose(1, 2)) if need1 else None
    g2 = torch.matmul(F1.to(dF.dtype).transpose(1, 2), dF) if need2 else None
    return g1, g2


def _build_backward(dW, needs, A1, A2, B1, B2, layout):
    f = inner_dtype(dW.dtype)
    A, B = _factor(A1, A2, f), _factor(B1, B2, f)
    (C, p, q), (s, t) = A.shape, B.shape[1:]
    if layout == "tinybig":   # W = reshape(outer(vec A, vec B))
        G = dW.to(f).reshape(C, p * q, s * t)
        dA = torch.matmul(G, B.reshape(C, s * t, 1)).reshape(C, p, q)
        dB = torch.matmul(A.reshape(C, 1, p * q), G).reshape(C, s, t)
    else:
        G = dW.to(f).reshape(C, p, s, q, t)
        dA = torch.einsum("cisjt,cst->cij", G, B)
        dB = torch.einsum("cisjt,cij->cst", G, A)
    return (*_chain(dA, A1, A2, *needs[:2]), *_chain(dB, B1, B2, *needs[2:]))


def _apply_backward(dy, needs, x, A1, A2, B1, B2, bias, layout):
    f = inner_dtype(x.dtype)
    gA = gB = (None, None)
    if needs[1] or needs[2]:
        gA = _chain(_grad_factor(dy, x, _factor(B1, B2, f), True), A1, A2, *needs[1:3])
    if needs[3] or needs[4]:
        gB = _chain(_grad_factor(dy, x, _factor(A1, A2, f), False), B1, B2, *needs[3:5])
    return _grad_x(dy, A1, A2, B1, B2) if needs[0] else None, *gA, *gB


ops.implement("kron_build", "triton", lambda A1, A2, B1, B2, layout: _launch_build(A1, A2, B1, B2, layout == "tinybig"),
              _build_backward, first_order=False)
ops.implement("kron_apply", "triton",
              lambda x, A1, A2, B1, B2, bias, layout: _launch_mm(x.expand(A1.shape[0], *x.shape), A1, A2, B1, B2,
                                                                 bias, A1.shape[0], 1),
              _apply_backward)
