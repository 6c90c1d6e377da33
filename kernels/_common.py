"""What every Triton module shares."""
import os

import triton

# The interpreter (TRITON_INTERPRET=1) runs kernels on CPU tensors; autotuning there only costs time.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune(configs, key):
    """``triton.autotune`` over ``configs`` on a GPU; the first config alone under the interpreter."""
    return triton.autotune(configs=configs[:1] if INTERPRET else configs, key=key)
