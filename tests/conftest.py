"""Shared test settings: per-dtype tolerances and the backends this machine can run.

Triton runs on CPU tensors under its interpreter, which must be switched on before triton
is imported: without a GPU the tests turn it on themselves.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tinyrecon import dispatch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Tolerances against a float64 (or float32) reference: one rounding of the output in the
# dtype plus fp32 accumulation error.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
DTYPES = list(TOL)


def assert_close(actual, expected, dtype=None):
    """Compare with the tolerance of ``dtype`` (default: actual's), scaled to expected's size."""
    dtype = dtype or actual.dtype
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    tol = TOL[dtype]
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=tol["rtol"],
                               atol=tol["atol"] * scale, check_dtype=False)


def backends_for(op: str):
    """Backends that can run ``op`` here; the others are listed as skipped with the reason."""
    params = []
    for b in dispatch.BACKENDS:
        reason = dispatch.why_not(b, op, torch.device(DEVICE).type)
        params.append(pytest.param(b, marks=pytest.mark.skipif(bool(reason), reason=reason), id=b))
    return params
