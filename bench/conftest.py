"""pytest-benchmark suite over the cases of ``tinyrecon.benchmark.cases`` (the list ``tinyrecon bench`` runs).

    pytest bench/ --benchmark-only                              # small shapes
    pytest bench/ --benchmark-only --bench-shapes=tall,mnist    # or TINYRECON_BENCH_SHAPES=all

Each case runs four times: the candidate and the three baselines (tinyBIG's algorithm: build W
with the torch reference, then F.linear; a dense nn.Linear of the same n x D; x.sum(), one read
of x, the floor of any apply), grouped by case
so pytest-benchmark prints them side by side. The candidate is first checked against the
float64 torch reference: a wrong result fails the test and is not timed.
"""
import os

import pytest
import torch

from tinyrecon.benchmark import cases, check, timing

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS = ("candidate", "tinybig", "dense", "floor")


def pytest_addoption(parser):
    parser.addoption("--bench-shapes", default=os.environ.get("TINYRECON_BENCH_SHAPES", "small"),
                     help=f"comma-separated shapes ({', '.join(cases.SHAPES)}) or 'all'; default small")
    parser.addoption("--bench-dtype", default=os.environ.get("TINYRECON_BENCH_DTYPE", "float32"),
                     choices=list(cases.DTYPES))


def pytest_collect_file(file_path, parent):
    # bench_<family>.py are this suite's modules: pytest collects only test_*.py by default,
    # except files named on the command line (those it collects itself).
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        shapes = metafunc.config.getoption("bench_shapes")
        functions = cases.family_functions(metafunc.module.FAMILY)
        selected = cases.select(functions, None if shapes == "all" else [shapes], quick=False)
        metafunc.parametrize("case", selected, ids=[c.id for c in selected])
        metafunc.parametrize("impl", IMPLS)


@pytest.fixture
def dtype(request):
    return cases.DTYPES[request.config.getoption("bench_dtype")]


def run_benchmark(benchmark, case, impl, dtype):
    reason = cases.skip_reason(case, DEVICE, dtype)
    if reason:
        pytest.skip(reason)
    fns, reference = check.prepare(case, dtype, DEVICE)
    if impl not in fns:
        pytest.skip(f"no {impl} baseline for {case.op}")
    if impl == "candidate":
        used = check.tolerance_used(fns["candidate"](), reference(), dtype)
        if not used <= 1.0:
            pytest.fail(f"{case.id}: differs from the torch reference by {used:.3g}x the tolerance; not timed")
    fn = fns[impl]
    benchmark.group = case.id
    benchmark.extra_info.update(function=case.function, shape=case.shape, op=case.op, backend=case.backend,
                                impl=impl, dtype=str(dtype))
    benchmark(lambda: (fn(), timing.synchronize(DEVICE)))
