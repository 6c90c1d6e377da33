"""The CUDA backend: every op of :mod:`tinyrecon.ops` for which the library built from ``csrc/*.cu``
(:mod:`tinyrecon.cuda_lib`) has the entry points ``tinyrecon_<op>`` and ``tinyrecon_<op>_bwd``
(``TR_OP`` in ``csrc/common.cuh``), found in the library's own list: an op comes to this backend
with its C source alone. They run on the caller's current stream.

An entry point takes (device, stream, dtype code, args, work, work_bytes). ``args`` holds four
int64 slots per argument of the op's declaration, in order, then the tensors the call writes (the
output; for the backward, dy and then the gradients of the declared inputs): a tensor is its address
and sizes (left-aligned, 1 past its last dimension), passed contiguous (the ABI has no strides); None
is a null address, an int its value, a layout its code. Called first with ``work_bytes``, an entry
point reports the workspace it needs and launches nothing.
"""
import ctypes

import torch
from torch import Tensor

from . import cuda_lib, ops
from ._clib import address as _ptr
from .base import LAYOUTS

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def _slots(values) -> list:
    slots = []
    for v in values:
        if isinstance(v, Tensor):
            if v.dim() > 3:
                raise ValueError(f"the CUDA library takes tensors of up to 3 dimensions, got {tuple(v.shape)}")
            slots += [v.data_ptr(), *v.shape, *(1,) * (3 - v.dim())]
        else:   # None, an int, a layout
            slots += [LAYOUTS.index(v) if isinstance(v, str) else v or 0, 0, 0, 0]
    return slots


def _launch(name: str, values: list) -> None:
    """Run entry point ``name`` on ``values`` (its args, tensors contiguous) on the current stream of
    their first tensor's device, with the workspace it asks for."""
    like = next(v for v in values if isinstance(v, Tensor))
    if like.dtype not in _DTYPES:
        raise TypeError(f"the CUDA backend supports {list(_DTYPES)}, got {like.dtype}")
    # (host memory: only the test build of the library takes it, tests/simt/)
    stream = torch.cuda.current_stream(like.device).cuda_stream if like.is_cuda else None
    head = [like.device.index or 0, stream, _DTYPES[like.dtype]]
    slots = _slots(values)
    args, size = (ctypes.c_int64 * len(slots))(*slots), ctypes.c_int64(0)
    cuda_lib.call(name, *head, args, None, ctypes.byref(size))
    work = torch.empty(size.value, dtype=torch.uint8, device=like.device) if size.value else None
    cuda_lib.call(name, *head, args, _ptr(work), None)


def _contiguous(args) -> list:
    return [a.contiguous() if isinstance(a, Tensor) else a for a in args]


def _implement(op: ops.Op) -> None:
    names = [p for p, _ in op.params]
    computed = [names.index(g) for g in op.grads if g != "bias"]

    def forward(*args):
        args = _contiguous(args)
        out = op.fake(*args)   # an uninitialized output of the declared shape
        _launch(f"tinyrecon_{op.name}", [*args, out])
        return out

    def backward(dy, needs, *args):
        args = _contiguous(args)
        grads = [None if args[i] is None else torch.empty_like(args[i]) for i in computed]
        _launch(f"tinyrecon_{op.name}_bwd", [*args, dy.contiguous(), *grads])
        return grads

    ops.implement(op.name, "cuda", forward, backward)   # layout="tinybig": the build and one GEMM


def register() -> None:
    """Register every declared op the loaded library has entry points for (those not registered yet)."""
    entry_points = cuda_lib.entry_points()
    for name, op in ops.OPS.items():
        if "cuda" not in op.impls and {f"tinyrecon_{name}", f"tinyrecon_{name}_bwd"} <= entry_points:
            _implement(op)


register()
