"""pytest-benchmark cases of the Kronecker family (hm, lphm, dual_lphm); see bench/conftest.py."""
from conftest import run_benchmark

FAMILY = "kron"


def test_kron(benchmark, case, impl, dtype):
    run_benchmark(benchmark, case, impl, dtype)
