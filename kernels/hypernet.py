"""Triton kernels for the hypernet family; the spec is ``tinyrecon/functions/hypernet.py``.

Both functions are ``W_c = reshape(M @ v_c (+ m0), n, D)`` with ``M[e, j] = tl.randn(seed_m, e*k + j)``
(n*D x k, never stored: 5G values for hypernet at the MNIST layer), ``v_c`` = hypernet's
``sigmoid(W1 w + b1)`` (k = hidden_dim, m0 = b2) or ``z`` (k = r). The apply is W-stationary: a
program generates one tile of W once (k normals per element, far dearer than the GEMM), multiplies
it into the rows of its chunk of x and adds its partial ``y`` with atomics. The backward regenerates
the tile, adds ``dy @ W`` into dx with atomics, and reduces ``dW = dy^T x`` against M for ``dv``.
"""
import torch
import triton
import triton.language as tl

from .. import ops
from ._common import INTERPRET, acc_type, inner_dtype, mixed_precision, sm_count

_BLOCK = 32 if INTERPRET else 1024       # build: elements of W per program
_BM = 16 if INTERPRET else 32            # apply: rows of x per step (64 spills next to a 64 x 64 W tile)


def _tile(size: int, dtype: torch.dtype) -> int:
    """A power-of-two tile edge for n or D in [16, 64] (fp64: at most 32, shared memory; interpreted: 16)."""
    top = 32 if dtype == torch.float64 else 64
    return 16 if INTERPRET else min(top, max(16, triton.next_power_of_2(size)))


def _row_chunks(N: int, tiles: int, device: torch.device) -> int:
    """Row chunks per W tile: enough programs to fill the GPU; each chunk regenerates its tile."""
    target = 8 if INTERPRET else 4 * sm_count(device)
    return max(1, min(triton.cdiv(N, _BM), target // tiles))


@triton.jit
def _w_tile(V, c, svc, svk, k, seed_m, seed_c, idx, inside, HAS_M0: tl.constexpr, ACC: tl.constexpr):
    """``W_c`` at flat indices ``idx``: ``sum_j M[idx, j] v_c[j] (+ m0[idx])``; 0 outside."""
    w = tl.zeros(idx.shape, ACC)
    if HAS_M0:
        w += tl.randn(seed_c, idx).to(ACC)
    for j in range(k):
        w += tl.randn(seed_m, idx * k + j).to(ACC) * tl.load(V + c * svc + j * svk).to(ACC)
    return tl.where(inside, w, 0.0)


# ---- build ---------------------------------------------------------------------------------------
@triton.jit
def _build_kernel(V, W, numel, k, seed_m, seed_c, svc, svk,
                  HAS_M0: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(1).to(tl.int64)
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    w = _w_tile(V, c, svc, svk, k, seed_m, seed_c, idx, idx < numel, HAS_M0, ACC)
    tl.store(W + c * numel + idx, w.to(W.dtype.element_ty), mask=idx < numel)


@triton.jit
def _build_grad_kernel(G, Part, numel, k, seed_m, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Part[c, pid, j] = sum over this block of M[e, j] * dW_c[e]."""
    pid, c = tl.program_id(0), tl.program_id(1).to(tl.int64)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    g = tl.load(G + c * numel + idx, mask=idx < numel, other=0.0).to(ACC)
    out = Part + (c * tl.num_programs(0) + pid) * k
    for j in range(k):
        tl.store(out + j, tl.sum(tl.randn(seed_m, idx * k + j).to(ACC) * g, axis=0))


def _build(v, seed_m, seed_c, n, D):
    """``reshape(M @ v_c (+ m0), C, n, D)`` for v (C, k)."""
    C, k = v.shape
    W = torch.empty(C, n, D, dtype=v.dtype, device=v.device)
    if W.numel():
        _build_kernel[(triton.cdiv(n * D, _BLOCK), C)](v, W, n * D, k, seed_m, seed_c or 0, *v.stride(),
                                                      HAS_M0=seed_c is not None, ACC=acc_type(v.dtype),
                                                      BLOCK=_BLOCK)
    return W


def _build_backward(dW, seed_m, k):
    """``dv_c = M^T vec(dW_c)``: (C, k), in fp32 (fp64 for fp64)."""
    C, numel = dW.shape[0], dW[0].numel()
    f = inner_dtype(dW.dtype)
    blocks = triton.cdiv(numel, _BLOCK)
    part = torch.zeros(C, blocks, k, dtype=f, device=dW.device)
    if part.numel():
        _build_grad_kernel[(blocks, C)](dW.contiguous(), part, numel, k, seed_m, ACC=acc_type(dW.dtype), BLOCK=_BLOCK)
    return part.sum(1)


# ---- apply ---------------------------------------------------------------------------------------
@triton.jit
def _apply_kernel(X, V, Y, N, D, n, k, seed_m, seed_c, sxm, sxd, svc, svk,
                  HAS_M0: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Y[c] += x @ W_c^T, one (BN x BK) tile of W_c per program, for the rows of its chunk.
    The W tile is an fp32 sum: dots in fp32 (TF32 for half types, see ``mixed_precision``)."""
    pid, chunk, c = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    tiles_d = tl.cdiv(D, BK)
    i = (pid // tiles_d).to(tl.int64) * BN + tl.arange(0, BN)
    d = (pid % tiles_d).to(tl.int64) * BK + tl.arange(0, BK)
    inside = (i[:, None] < n) & (d[None, :] < D)
    w = _w_tile(V, c, svc, svk, k, seed_m, seed_c, i[:, None] * D + d[None, :], inside, HAS_M0, ACC)
    wt = tl.trans(w)                                                          # (BK, BN)
    rows_per = tl.cdiv(tl.cdiv(N, BM), tl.num_programs(1)) * BM
    for m0 in range(chunk * rows_per, tl.minimum(chunk * rows_per + rows_per, N), BM):
        rows = m0 + tl.arange(0, BM).to(tl.int64)
        xt = tl.load(X + rows[:, None] * sxm + d[None, :] * sxd,
                     mask=(rows[:, None] < N) & (d[None, :] < D), other=0.0)
        y = tl.dot(xt.to(ACC), wt, input_precision=PREC, out_dtype=ACC)
        tl.atomic_add(Y + (c * N + rows[:, None]) * n + i[None, :], y,
                      mask=(rows[:, None] < N) & (i[None, :] < n), sem="relaxed")


@triton.jit
def _apply_grad_kernel(X, V, DY, DX, Part, N, D, n, k, seed_m, seed_c, sxm, sxd, svc, svk, sdc, sdm, sdi,
                       NEED_X: tl.constexpr, HAS_M0: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """DX += dy_c @ W_c (this tile); Part[c, chunk, pid, j] = sum over the tile of M[e, j] (dy_c^T x)[e]."""
    pid, chunk, c = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    tiles_d = tl.cdiv(D, BK)
    i = (pid // tiles_d).to(tl.int64) * BN + tl.arange(0, BN)
    d = (pid % tiles_d).to(tl.int64) * BK + tl.arange(0, BK)
    idx = i[:, None] * D + d[None, :]
    inside = (i[:, None] < n) & (d[None, :] < D)
    if NEED_X:
        w = _w_tile(V, c, svc, svk, k, seed_m, seed_c, idx, inside, HAS_M0, ACC)
    g = tl.zeros((BN, BK), ACC)                                               # this tile of dy_c^T x
    rows_per = tl.cdiv(tl.cdiv(N, BM), tl.num_programs(1)) * BM
    for m0 in range(chunk * rows_per, tl.minimum(chunk * rows_per + rows_per, N), BM):
        rows = m0 + tl.arange(0, BM).to(tl.int64)
        dyt = tl.load(DY + c * sdc + rows[:, None] * sdm + i[None, :] * sdi,
                      mask=(rows[:, None] < N) & (i[None, :] < n), other=0.0).to(ACC)
        xt = tl.load(X + rows[:, None] * sxm + d[None, :] * sxd,
                     mask=(rows[:, None] < N) & (d[None, :] < D), other=0.0).to(ACC)
        g = tl.dot(tl.trans(dyt), xt, g, input_precision=PREC, out_dtype=g.dtype)
        if NEED_X:
            tl.atomic_add(DX + rows[:, None] * D + d[None, :], tl.dot(dyt, w, input_precision=PREC, out_dtype=ACC),
                          mask=(rows[:, None] < N) & (d[None, :] < D), sem="relaxed")
    out = Part + ((c * tl.num_programs(1) + chunk) * tl.num_programs(0) + pid) * k
    for j in range(k):
        tl.store(out + j, tl.sum(tl.randn(seed_m, idx * k + j).to(ACC) * g))   # g is 0 outside W


def _grid(N, n, D, C, x):
    BN, BK = _tile(n, x.dtype), _tile(D, x.dtype)
    tiles = triton.cdiv(n, BN) * triton.cdiv(D, BK)
    # 8 warps: with 4, the fp32 64 x 64 tile of W and its gradient spill registers (ptxas -v)
    return (tiles, _row_chunks(N, tiles * C, x.device), C), dict(BM=_BM, BN=BN, BK=BK, PREC=mixed_precision(x.dtype),
                                                                 num_warps=8)


def _apply(x, v, seed_m, seed_c, n, bias):
    """``x @ W_c^T + bias`` for every channel c: (C, N, n)."""
    C, k = v.shape
    N, D = x.shape
    y = torch.zeros(C, N, n, dtype=inner_dtype(x.dtype), device=x.device)
    if y.numel():
        grid, blocks = _grid(N, n, D, C, x)
        _apply_kernel[grid](x, v, y, N, D, n, k, seed_m, seed_c or 0, *x.stride(), *v.stride(),
                            HAS_M0=seed_c is not None, ACC=acc_type(x.dtype), **blocks)
    if bias is not None:
        y += bias
    return y.to(x.dtype)


def _apply_backward(dy, x, v, seed_m, seed_c, need_x):
    """(dx, or an empty tensor unless ``need_x``; dv (C, k) in fp32, fp64 for fp64)."""
    C, k = v.shape
    N, D = x.shape
    n = dy.shape[2]
    f = inner_dtype(x.dtype)
    dx = torch.zeros((N, D) if need_x else (0,), dtype=f, device=x.device)
    grid, blocks = _grid(N, n, D, C, x)
    part = torch.zeros(C, grid[1], grid[0], k, dtype=f, device=x.device)
    if N:
        _apply_grad_kernel[grid](x, v, dy, dx, part, N, D, n, k, seed_m, seed_c or 0, *x.stride(), *v.stride(),
                                 *dy.stride(), NEED_X=need_x, HAS_M0=seed_c is not None, ACC=acc_type(x.dtype),
                                 **blocks)
    return dx.to(x.dtype), part.sum((1, 2))


# Both functions are the same kernels: hypernet with c = b2, random_matrix_hypernet without.
ops.implement("hypernet_build", "triton", _build,
              lambda dW, needs, v, seed_m, seed_c, n, D: (_build_backward(dW, seed_m, v.shape[1]),))
ops.implement("random_matrix_hypernet_build", "triton", lambda z, seed_t, n, D: _build(z, seed_t, None, n, D),
              lambda dW, needs, z, seed_t, n, D: (_build_backward(dW, seed_t, z.shape[1]),))
ops.implement("hypernet_apply", "triton", _apply,
              lambda dy, needs, x, v, seed_m, seed_c, n, bias: _apply_backward(dy, x, v, seed_m, seed_c, needs[0]))
ops.implement("random_matrix_hypernet_apply", "triton",
              lambda x, z, seed_t, n, bias: _apply(x, z, seed_t, None, n, bias),
              lambda dy, needs, x, z, seed_t, n, bias: _apply_backward(dy, x, z, seed_t, None, needs[0]))
