"""What every Triton module shares: autotuning, and the dtypes kernels compute in."""
import os

import torch
import triton
import triton.language as tl

# The interpreter (TRITON_INTERPRET=1) runs kernels on CPU tensors; autotuning there only costs time.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_TL = {torch.float64: tl.float64, torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def autotune(configs, key):
    """``triton.autotune`` over ``configs`` on a GPU; the first config alone under the interpreter."""
    return triton.autotune(configs=configs[:1] if INTERPRET else configs, key=key)


def acc_type(dtype: torch.dtype):
    """Accumulate in float64 for float64 data, float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def inner_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of intermediates in memory: fp32 for half types, so they are rounded once, at the end."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rank_block(r: int) -> int:
    """A rank dimension as one power-of-two tile, at least 16 wide (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(r))


def dot_dtype(dtype: torch.dtype):
    """Dtype of tl.dot operands: the input's, but fp32 for bf16 under the interpreter, whose bf16 dot
    is wrong (Triton 3.7, 3.8); bf16 products are exact in fp32, so the result is what a GPU computes."""
    return tl.float32 if INTERPRET and dtype == torch.bfloat16 else _TL[dtype]


def precision(dtype: torch.dtype) -> str:
    """fp32 inputs: IEEE products (the tolerance is fp32's) unless the user allowed TF32 in torch."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
