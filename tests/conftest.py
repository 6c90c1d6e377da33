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
from tinyrecon.benchmark import TOL  # noqa: E402  (one table: the benchmark checks kernels with it too)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

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
