"""The CUDA backend: ops of the hot families as ``torch.library`` custom ops over the C library.

Each op has the signature of its torch reference (``functions/kron.py``, ``padding.py``,
``lowrank.py``); forward and backward are launches of ``csrc/`` kernels (through
:mod:`tinyrecon.cuda_lib`) on the caller's current stream, so ``torch.compile`` sees one op
per call, not a graph break. Inputs are made contiguous here; the library takes raw pointers.
"""
import ctypes
from typing import Optional

import torch
from torch import Tensor

from . import cuda_lib
from .base import register_first_order
from .functions import kron as _kron_ref

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_LAYOUTS = {"kron": 0, "tinybig": 1}


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _c(t: Optional[Tensor]) -> Optional[Tensor]:
    # The entry points take dense row-major buffers: no strides in the C ABI. A strided bias (apply
    # passes views through) is copied here too rather than given a stride argument: its n values
    # cost nothing next to the GEMM, and the ABI and kernels of csrc/ keep one dense contract.
    return None if t is None else t.contiguous()


def _launch(name: str, like: Tensor, args: list, dims: list, workspace: bool = False) -> None:
    """Run entry point ``name`` for tensors like ``like`` on its device's current stream.

    ``workspace``: the entry takes (work, work_bytes) between ``args`` and ``dims``; it is asked
    for the size first and given that many bytes from torch's caching allocator.
    """
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


def _bias_grad(gy: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
    if bias is None:
        return None
    inner = torch.float64 if gy.dtype == torch.float64 else torch.float32
    return gy.sum((0, 1), dtype=inner).to(bias.dtype)


def _empty(t: Tensor) -> Tensor:
    """An uninitialized contiguous tensor like ``t`` (the library writes dense row-major buffers)."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


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


@torch.library.custom_op("tinyrecon::cuda_kron_build", mutates_args=())
def kron_build(A1: Tensor, A2: Optional[Tensor], B1: Tensor, B2: Optional[Tensor], layout: str) -> Tensor:
    A1, A2, B1, B2 = map(_c, (A1, A2, B1, B2))
    dims = _kron_dims(A1, A2, B1, B2)
    C, p, q, _, s, t, _ = dims
    W = A1.new_empty(C, p * s, q * t)
    _launch("tinyrecon_kron_build", A1, [_LAYOUTS[layout], *map(_ptr, (A1, A2, B1, B2, W))], dims, workspace=True)
    return W


@kron_build.register_fake
def _(A1, A2, B1, B2, layout):
    C, p, q, _, s, t, _ = _kron_dims(A1, A2, B1, B2)
    return A1.new_empty(C, p * s, q * t)


@torch.library.custom_op("tinyrecon::cuda_kron_build_bwd", mutates_args=())
def _kron_build_bwd(gW: Tensor, A1: Tensor, A2: Optional[Tensor], B1: Tensor, B2: Optional[Tensor],
                    layout: str) -> list[Tensor]:
    gW, A1, A2, B1, B2 = map(_c, (gW, A1, A2, B1, B2))
    grads = [_empty(A1), _grad_like(A2, A1), _empty(B1), _grad_like(B2, B1)]
    _launch("tinyrecon_kron_build_bwd", A1, [_LAYOUTS[layout], *map(_ptr, (A1, A2, B1, B2, gW, *grads))],
            _kron_dims(A1, A2, B1, B2), workspace=True)
    return grads


@_kron_build_bwd.register_fake
def _(gW, A1, A2, B1, B2, layout):
    return [_empty(A1), _grad_like(A2, A1), _empty(B1), _grad_like(B2, B1)]


def _kron_build_backward(ctx, gW):
    A1, A2, B1, B2 = ctx.saved_tensors
    gA1, gA2, gB1, gB2 = _kron_build_bwd(gW, A1, A2, B1, B2, ctx.layout)
    return gA1, (gA2 if A2 is not None else None), gB1, (gB2 if B2 is not None else None), None


def _kron_build_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.layout = inputs[4]


register_first_order(kron_build, _kron_build_backward, _kron_build_setup, "cuda")


@torch.library.custom_op("tinyrecon::cuda_kron_apply", mutates_args=())
def _kron_apply(x: Tensor, A1: Tensor, A2: Optional[Tensor], B1: Tensor, B2: Optional[Tensor],
                bias: Optional[Tensor]) -> Tensor:
    x, A1, A2, B1, B2, bias = map(_c, (x, A1, A2, B1, B2, bias))
    dims = _kron_dims(A1, A2, B1, B2)
    C, p, _, _, s, _, _ = dims
    y = x.new_empty(C, x.shape[0], p * s)
    _launch("tinyrecon_kron_apply", x, list(map(_ptr, (x, A1, A2, B1, B2, bias, y))), [x.shape[0], *dims],
            workspace=True)
    return y


@_kron_apply.register_fake
def _(x, A1, A2, B1, B2, bias):
    C, p, _, _, s, _, _ = _kron_dims(A1, A2, B1, B2)
    return x.new_empty(C, x.shape[0], p * s)


@torch.library.custom_op("tinyrecon::cuda_kron_apply_bwd", mutates_args=())
def _kron_apply_bwd(gy: Tensor, x: Tensor, A1: Tensor, A2: Optional[Tensor], B1: Tensor,
                    B2: Optional[Tensor]) -> list[Tensor]:
    gy, x, A1, A2, B1, B2 = map(_c, (gy, x, A1, A2, B1, B2))
    grads = [_empty(x), _empty(A1), _grad_like(A2, A1), _empty(B1), _grad_like(B2, B1)]
    _launch("tinyrecon_kron_apply_bwd", x, list(map(_ptr, (x, A1, A2, B1, B2, gy, *grads))),
            [x.shape[0], *_kron_dims(A1, A2, B1, B2)], workspace=True)
    return grads


@_kron_apply_bwd.register_fake
def _(gy, x, A1, A2, B1, B2):
    return [_empty(x), _empty(A1), _grad_like(A2, A1), _empty(B1), _grad_like(B2, B1)]


def _kron_apply_backward(ctx, gy):
    x, A1, A2, B1, B2, bias = ctx.saved_tensors
    gx, gA1, gA2, gB1, gB2 = _kron_apply_bwd(gy, x, A1, A2, B1, B2)
    return gx, gA1, (gA2 if A2 is not None else None), gB1, (gB2 if B2 is not None else None), _bias_grad(gy, bias)


register_first_order(_kron_apply, _kron_apply_backward, _save_inputs, "cuda")


def kron_apply(x, A1, A2, B1, B2, bias, layout: str):
    if layout == "tinybig":
        # tinyBIG's outer-product layout has no CUDA kernel: its structured torch reference runs it.
        return _kron_ref.kron_apply(x, A1, A2, B1, B2, bias, layout)
    return _kron_apply(x, A1, A2, B1, B2, bias)


# ---- block-diagonal padding -------------------------------------------------------------------------
def _block_dims(B: Tensor, p: int, q: int) -> list:
    C, s, t = B.shape
    return [C, p, q, s, t]


@torch.library.custom_op("tinyrecon::cuda_block_diag_build", mutates_args=())
def block_diag_build(B: Tensor, p: int, q: int) -> Tensor:
    B = B.contiguous()
    C, s, t = B.shape
    W = B.new_empty(C, p * s, q * t)
    _launch("tinyrecon_block_diag_build", B, [_ptr(B), _ptr(W)], _block_dims(B, p, q))
    return W


@block_diag_build.register_fake
def _(B, p, q):
    return B.new_empty(B.shape[0], p * B.shape[1], q * B.shape[2])


@torch.library.custom_op("tinyrecon::cuda_block_diag_build_bwd", mutates_args=())
def _block_diag_build_bwd(gW: Tensor, B: Tensor, p: int, q: int) -> Tensor:
    gW = gW.contiguous()
    gB = _empty(B)
    _launch("tinyrecon_block_diag_build_bwd", B, [_ptr(gW), _ptr(gB)], _block_dims(B, p, q))
    return gB


@_block_diag_build_bwd.register_fake
def _(gW, B, p, q):
    return _empty(B)


def _block_diag_build_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.pq = inputs[1:3]


def _block_diag_build_backward(ctx, gW):
    (B,) = ctx.saved_tensors
    return _block_diag_build_bwd(gW, B, *ctx.pq), None, None


register_first_order(block_diag_build, _block_diag_build_backward, _block_diag_build_setup, "cuda")


@torch.library.custom_op("tinyrecon::cuda_block_diag_apply", mutates_args=())
def block_diag_apply(x: Tensor, B: Tensor, p: int, q: int, bias: Optional[Tensor]) -> Tensor:
    x, B, bias = map(_c, (x, B, bias))
    C, s, _ = B.shape
    y = x.new_empty(C, x.shape[0], p * s)
    _launch("tinyrecon_block_diag_apply", x, list(map(_ptr, (x, B, bias, y))), [x.shape[0], *_block_dims(B, p, q)])
    return y


@block_diag_apply.register_fake
def _(x, B, p, q, bias):
    return x.new_empty(B.shape[0], x.shape[0], p * B.shape[1])


@torch.library.custom_op("tinyrecon::cuda_block_diag_apply_bwd", mutates_args=())
def _block_diag_apply_bwd(gy: Tensor, x: Tensor, B: Tensor, p: int, q: int) -> list[Tensor]:
    gy, x, B = map(_c, (gy, x, B))
    gx, gB = _empty(x), _empty(B)
    _launch("tinyrecon_block_diag_apply_bwd", x, list(map(_ptr, (x, B, gy, gx, gB))),
            [x.shape[0], *_block_dims(B, p, q)], workspace=True)
    return [gx, gB]


@_block_diag_apply_bwd.register_fake
def _(gy, x, B, p, q):
    return [_empty(x), _empty(B)]


def _block_diag_apply_setup(ctx, inputs, output):
    x, B, p, q, bias = inputs
    ctx.save_for_backward(x, B, bias)
    ctx.pq = (p, q)


def _block_diag_apply_backward(ctx, gy):
    x, B, bias = ctx.saved_tensors
    gx, gB = _block_diag_apply_bwd(gy, x, B, *ctx.pq)
    return gx, gB, None, None, _bias_grad(gy, bias)


register_first_order(block_diag_apply, _block_diag_apply_backward, _block_diag_apply_setup, "cuda")


# ---- low rank (lorr) --------------------------------------------------------------------------------
@torch.library.custom_op("tinyrecon::cuda_lowrank_build", mutates_args=())
def lowrank_build(A: Tensor, B: Tensor) -> Tensor:
    A, B = A.contiguous(), B.contiguous()
    (C, n, r), D = A.shape, B.shape[2]
    W = A.new_empty(C, n, D)
    _launch("tinyrecon_lowrank_build", A, [_ptr(A), _ptr(B), _ptr(W)], [C, n, r, D])
    return W


@lowrank_build.register_fake
def _(A, B):
    return A.new_empty(A.shape[0], A.shape[1], B.shape[2])


@torch.library.custom_op("tinyrecon::cuda_lowrank_build_bwd", mutates_args=())
def _lowrank_build_bwd(gW: Tensor, A: Tensor, B: Tensor) -> list[Tensor]:
    gW, A, B = gW.contiguous(), A.contiguous(), B.contiguous()
    gA, gB = _empty(A), _empty(B)
    _launch("tinyrecon_lowrank_build_bwd", A, list(map(_ptr, (A, B, gW, gA, gB))), [*A.shape, B.shape[2]])
    return [gA, gB]


@_lowrank_build_bwd.register_fake
def _(gW, A, B):
    return [_empty(A), _empty(B)]


def _lowrank_build_backward(ctx, gW):
    A, B = ctx.saved_tensors
    return tuple(_lowrank_build_bwd(gW, A, B))


register_first_order(lowrank_build, _lowrank_build_backward, _save_inputs, "cuda")


@torch.library.custom_op("tinyrecon::cuda_lowrank_apply", mutates_args=())
def lowrank_apply(x: Tensor, A: Tensor, B: Tensor, bias: Optional[Tensor]) -> Tensor:
    x, A, B, bias = map(_c, (x, A, B, bias))
    C, n, r = A.shape
    N, D = x.shape
    y = x.new_empty(C, N, n)
    _launch("tinyrecon_lowrank_apply", x, list(map(_ptr, (x, A, B, bias, y))), [N, C, n, r, D], workspace=True)
    return y


@lowrank_apply.register_fake
def _(x, A, B, bias):
    return x.new_empty(A.shape[0], x.shape[0], A.shape[1])


@torch.library.custom_op("tinyrecon::cuda_lowrank_apply_bwd", mutates_args=())
def _lowrank_apply_bwd(gy: Tensor, x: Tensor, A: Tensor, B: Tensor) -> list[Tensor]:
    gy, x, A, B = map(_c, (gy, x, A, B))
    C, n, r = A.shape
    N, D = x.shape
    gx, gA, gB = _empty(x), _empty(A), _empty(B)
    _launch("tinyrecon_lowrank_apply_bwd", x, list(map(_ptr, (x, A, B, gy, gx, gA, gB))), [N, C, n, r, D],
            workspace=True)
    return [gx, gA, gB]


@_lowrank_apply_bwd.register_fake
def _(gy, x, A, B):
    return [_empty(t) for t in (x, A, B)]


def _lowrank_apply_backward(ctx, gy):
    x, A, B, bias = ctx.saved_tensors
    return (*_lowrank_apply_bwd(gy, x, A, B), _bias_grad(gy, bias))


register_first_order(lowrank_apply, _lowrank_apply_backward, _save_inputs, "cuda")
