"""pytest-benchmark cases of the hypernet family (hypernet, random_matrix_hypernet); see bench/conftest.py."""
from conftest import run_benchmark

FAMILY = "hypernet"


def test_hypernet(benchmark, case, impl, dtype):
    run_benchmark(benchmark, case, impl, dtype)
