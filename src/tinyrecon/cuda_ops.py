"""The CUDA backend: launches of ``csrc/*.cu`` kernels (:mod:`tinyrecon.cuda_lib`) on the caller's
current stream, forward and backward, for the hot families' ops. The library takes raw pointers to
contiguous tensors."""
import ctypes
from typing import Optional

import torch
from torch import Tensor

from . import cuda_lib, ops
from ._clib import address as _ptr

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_LAYOUTS = {"kron": 0, "tinybig": 1}


def _c(t: Optional[Tensor]) -> Optional[Tensor]:
    # No strides in the C ABI: even a strided bias is copied (its n values cost nothing next to the GEMM).
    return None if t is None else t.contiguous()


def _launch(name: str, like: Tensor, args: list, dims: list, workspace: bool = False) -> None:
    """Run entry point ``name`` for tensors like ``like`` on its device's current stream. ``workspace``:
    it takes (work, work_bytes) between ``args`` and ``dims``, asked for the size first."""
    if like.dtype not in _DTYPES:
        raise TypeError(f"the CUDA backend supports {list(_DTYPES)}, got {like.dtype}")
    if like.is_cuda:
        head = [like.device.index, torch.cuda.current_stream(like.device).cuda_stream, _DTYPES[like.dtype]]
    else:   # host memory: only the test build of the library takes it (tests/simt/)
        head = [0, None, _DTYPES[like.dtype]]
    if not workspace:
        cuda_lib.call(name, *head, *args, *dims)
        return
    size = ctypes.c_int64(0)
    cuda_lib.call(name, *head, *args, None, ctypes.byref(size), *dims)
    work = torch.empty(size.value, dtype=torch.uint8, device=like.device)
    cuda_lib.call(name, *head, *args, work.data_ptr(), None, *dims)


def _empty(t: Tensor) -> Tensor:
    """An uninitialized contiguous tensor like ``t`` (the library writes dense row-major buffers)."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


# ---- Kronecker family -------------------------------------------------------------------------------
def _kron_dims(A1, A2, B1, B2) -> list:
    """[C, p, q, rA, s, t, rB] for A = A1 [@ A2] (C, p, q) and B = B1 [@ B2] (C, s, t); r = 0 when unfactored."""
    C, p, rA = A1.shape
    _, s, rB = B1.shape
    q = A2.shape[2] if A2 is not None else rA
    t = B2.shape[2] if B2 is not None else rB
    return [C, p, q, rA if A2 is not None else 0, s, t, rB if B2 is not None else 0]


def _grad_like(F: Optional[Tensor], fallback: Tensor) -> Tensor:
    """Buffer for the gradient of an optional factor (an empty placeholder when it is absent)."""
    return _empty(F) if F is not None else fallback.new_empty(0)


def _kron_build(A1, A2, B1, B2, layout):
    A1, A2, B1, B2 = map(_c, (A1, A2, B1, B2))
    dims = _kron_dims(A1, A2, B1, B2)
    C, p, q, _, s, t, _ = dims
    W = A1.new_empty(C, p * s, q * t)
    _launch("tinyrecon_kron_build", A1, [_LAYOUTS[layout], *map(_ptr, (A1, A2, B1, B2, W))], dims, workspace=True)
    return W


def _kron_build_bwd(gW, needs, A1, A2, B1, B2, layout):
    gW, A1, A2, B1, B2 = map(_c, (gW, A1, A2, B1, B2))
    grads = [_empty(A1), _grad_like(A2, A1), _empty(B1), _grad_like(B2, B1)]
    _launch("tinyrecon_kron_build_bwd", A1, [_LAYOUTS[layout], *map(_ptr, (A1, A2, B1, B2, gW, *grads))],
            _kron_dims(A1, A2, B1, B2), workspace=True)
    return grads


def _kron_apply(x, A1, A2, B1, B2, bias, layout):
    x, A1, A2, B1, B2, bias = map(_c, (x, A1, A2, B1, B2, bias))
    dims = _kron_dims(A1, A2, B1, B2)
    C, p, _, _, s, _, _ = dims
    y = x.new_empty(C, x.shape[0], p * s)
    _launch("tinyrecon_kron_apply", x, list(map(_ptr, (x, A1, A2, B1, B2, bias, y))), [x.shape[0], *dims],
            workspace=True)
    return y


def _kron_apply_bwd(gy, needs, x, A1, A2, B1, B2, bias, layout):
    gy, x, A1, A2, B1, B2 = map(_c, (gy, x, A1, A2, B1, B2))
    grads = [_empty(x), _empty(A1), _grad_like(A2, A1), _empty(B1), _grad_like(B2, B1)]
    _launch("tinyrecon_kron_apply_bwd", x, list(map(_ptr, (x, A1, A2, B1, B2, gy, *grads))),
            [x.shape[0], *_kron_dims(A1, A2, B1, B2)], workspace=True)
    return grads


ops.implement("kron_build", "cuda", _kron_build, _kron_build_bwd)
ops.implement("kron_apply", "cuda", _kron_apply, _kron_apply_bwd)   # layout="tinybig": the build and one GEMM


# ---- duplicated_diagonal_padding --------------------------------------------------------------------
def _block_dims(B: Tensor, p: int, q: int) -> list:
    return [B.shape[0], p, q, *B.shape[1:]]


def _ddp_build(B, p, q):
    B = B.contiguous()
    C, s, t = B.shape
    W = B.new_empty(C, p * s, q * t)
    _launch("tinyrecon_duplicated_diagonal_padding_build", B, [_ptr(B), _ptr(W)], _block_dims(B, p, q))
    return W


def _ddp_build_bwd(gW, needs, B, p, q):
    gW = gW.contiguous()
    gB = _empty(B)
    _launch("tinyrecon_duplicated_diagonal_padding_build_bwd", B, [_ptr(gW), _ptr(gB)], _block_dims(B, p, q))
    return (gB,)


def _ddp_apply(x, B, p, q, bias):
    x, B, bias = map(_c, (x, B, bias))
    C, s, _ = B.shape
    y = x.new_empty(C, x.shape[0], p * s)
    _launch("tinyrecon_duplicated_diagonal_padding_apply", x, list(map(_ptr, (x, B, bias, y))),
            [x.shape[0], *_block_dims(B, p, q)])
    return y


def _ddp_apply_bwd(gy, needs, x, B, p, q, bias):
    gy, x, B = map(_c, (gy, x, B))
    gx, gB = _empty(x), _empty(B)
    _launch("tinyrecon_duplicated_diagonal_padding_apply_bwd", x, list(map(_ptr, (x, B, gy, gx, gB))),
            [x.shape[0], *_block_dims(B, p, q)], workspace=True)
    return gx, gB


ops.implement("duplicated_diagonal_padding_build", "cuda", _ddp_build, _ddp_build_bwd)
ops.implement("duplicated_diagonal_padding_apply", "cuda", _ddp_apply, _ddp_apply_bwd)


# ---- lorr -------------------------------------------------------------------------------------------
def _lorr_build(A, B):
    A, B = A.contiguous(), B.contiguous()
    (C, n, r), D = A.shape, B.shape[2]
    W = A.new_empty(C, n, D)
    _launch("tinyrecon_lorr_build", A, [_ptr(A), _ptr(B), _ptr(W)], [C, n, r, D])
    return W


def _lorr_build_bwd(gW, needs, A, B):
    gW, A, B = gW.contiguous(), A.contiguous(), B.contiguous()
    gA, gB = _empty(A), _empty(B)
    _launch("tinyrecon_lorr_build_bwd", A, list(map(_ptr, (A, B, gW, gA, gB))), [*A.shape, B.shape[2]])
    return gA, gB


def _lorr_apply(x, A, B, bias):
    x, A, B, bias = map(_c, (x, A, B, bias))
    C, n, r = A.shape
    N, D = x.shape
    y = x.new_empty(C, N, n)
    _launch("tinyrecon_lorr_apply", x, list(map(_ptr, (x, A, B, bias, y))), [N, C, n, r, D], workspace=True)
    return y


def _lorr_apply_bwd(gy, needs, x, A, B, bias):
    gy, x, A, B = map(_c, (gy, x, A, B))
    C, n, r = A.shape
    N, D = x.shape
    gx, gA, gB = _empty(x), _empty(A), _empty(B)
    _launch("tinyrecon_lorr_apply_bwd", x, list(map(_ptr, (x, A, B, gy, gx, gA, gB))), [N, C, n, r, D],
            workspace=True)
    return gx, gA, gB


ops.implement("lorr_build", "cuda", _lorr_build, _lorr_build_bwd)
ops.implement("lorr_apply", "cuda", _lorr_apply, _lorr_apply_bwd)
