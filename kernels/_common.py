"""What every Triton module shares: autotuning, and the dtypes kernels compute in."""
import os
import threading

import torch
import triton
import triton.language as tl

# The interpreter (TRITON_INTERPRET=1) runs kernels on CPU tensors; autotuning there only costs time.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_TL = {torch.float64: tl.float64, torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# Tests (TINYRECON_ALL_CONFIGS=1, interpreter only): launches take every autotune config in turn,
# so configs a GPU may pick are run and checked too, not only the first.
ALL_CONFIGS = os.environ.get("TINYRECON_ALL_CONFIGS", "0") not in ("", "0")


def autotune(configs, key):
    """``triton.autotune`` over ``configs`` on a GPU. Under the interpreter autotuning only costs
    time: launches take the first config, or with ``ALL_CONFIGS`` each config in turn."""
    if not INTERPRET:
        return triton.autotune(configs=configs, key=key)
    return lambda fn: _InTurn(fn, configs)


class _InTurn:
    """``fn[grid](...)`` launched with one of ``configs``: the first, or with ``ALL_CONFIGS`` launch
    i takes ``configs[i % len(configs)]``. ``launches`` counts them; ``used``: the configs' indices."""

    def __init__(self, fn, configs):
        self.fn, self.configs, self.used, self.launches = fn, configs, set(), 0
        self._lock = threading.Lock()

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            with self._lock:
                i = self.launches % len(self.configs) if ALL_CONFIGS else 0
                self.launches += 1
                self.used.add(i)
            return self.fn[grid](*args, **kwargs, **self.configs[i].all_kwargs())
        return launch


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
