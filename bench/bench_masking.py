"""pytest-benchmark cases of masking_reconciliation; see bench/conftest.py."""
from conftest import run_benchmark

FAMILY = "masking"


def test_masking(benchmark, case, impl, dtype):
    run_benchmark(benchmark, case, impl, dtype)
