"""pytest-benchmark cases of the low-rank family (lorr, random_matrix_adaption); see bench/conftest.py."""
from conftest import run_benchmark

FAMILY = "lowrank"


def test_lowrank(benchmark, case, impl, dtype):
    run_benchmark(benchmark, case, impl, dtype)
