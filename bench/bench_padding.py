"""pytest-benchmark cases of the padding family (duplicated_padding, duplicated_diagonal_padding); see bench/conftest.py."""
from conftest import run_benchmark

FAMILY = "padding"


def test_padding(benchmark, case, impl, dtype):
    run_benchmark(benchmark, case, impl, dtype)
