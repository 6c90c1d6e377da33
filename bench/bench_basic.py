"""pytest-benchmark cases of the basic functions (constant, zero, one, constant_eye, identity); see bench/conftest.py."""
from conftest import run_benchmark

FAMILY = "basic"


def test_basic(benchmark, case, impl, dtype):
    run_benchmark(benchmark, case, impl, dtype)
