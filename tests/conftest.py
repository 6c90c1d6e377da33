"""Shared test settings: per-dtype tolerances and the backends this machine can run.

Triton runs on CPU tensors under its interpreter, which must be switched on before triton
is imported: without a GPU the tests turn it on themselves.
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))   # build_libs.py: the C libraries' build commands

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tinyrecon import dispatch  # noqa: E402
from tinyrecon.tolerances import TOL  # noqa: E402  (one table: the benchmark checks kernels with it too)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

DTYPES = list(TOL)


@pytest.fixture(autouse=True)
def cpu_kernels_at_every_size(monkeypatch):
    """The CPU library's kernels take only x big enough to pay for them (``cpu_ops._MIN_ELEMENTS``),
    and a small W is built for one F.linear (``base.BUILD_BELOW``); tests use small shapes, so they
    run the structured applies and the kernels at every size (test_kron and test_small_apply check
    the rules themselves)."""
    from tinyrecon import base, cpu_ops
    monkeypatch.setattr(cpu_ops, "_MIN_ELEMENTS", 0)
    monkeypatch.setattr(base, "BUILD_BELOW", 0)


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


def check_compiles_to_one_op(rec, n: int, D: int, backend: str, channels: int = 2):
    """``torch.compile(fullgraph=True)`` of a tiny module calling ``rec.apply`` on ``backend``: the
    graph holds exactly one kernel op (forward and backward traced through aot_eager), and the
    values and gradients equal eager's. The small frozen matrices a hypernet draws in torch are an
    op of their own (``philox_values``) and do not count."""

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rec = rec
            shape = (channels, rec.calculate_l(n, D)) if channels > 1 else (rec.calculate_l(n, D),)
            self.w = torch.nn.Parameter(torch.randn(shape))
            self.b = torch.nn.Parameter(torch.randn(n))

        def forward(self, x):
            return torch.relu(self.rec.apply(x, self.w, n=n, bias=self.b, backend=backend)).mean(0)

    graphs = []

    def capture(gm, inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, inputs)

    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = Tiny().to(DEVICE), torch.randn(5, D, device=DEVICE)
    y = torch.compile(model, fullgraph=True, backend=capture)(x)
    assert_close(y, model(x))
    assert len(graphs) == 1
    # forward nodes, an autograd.Function's forward subgraph included (its backward subgraph is the
    # backward's business, as a custom op's registered backward is)
    targets = [str(node.target) for name, gm in graphs[0].named_modules()
               if isinstance(gm, torch.fx.GraphModule) and "bwd" not in name
               for node in gm.graph.nodes if node.op == "call_function"]
    assert sum("tinyrecon." in t and "philox" not in t for t in targets) == 1, targets
    for got, expected in zip(torch.autograd.grad(y.sum(), (model.w, model.b)),
                             torch.autograd.grad(model(x).sum(), (model.w, model.b))):
        assert_close(got, expected)


def check_apply_layouts(rec, n: int, D: int, backend: str, expected):
    """``rec.apply`` on strided, transposed, batched and empty x, with 3 channels and with one:
    shapes, and values against ``expected(rec, x, w, n, b)``."""
    w = torch.randn(3, rec.calculate_l(n, D), dtype=torch.float64, device=DEVICE)
    b = torch.randn(n, dtype=torch.float64, device=DEVICE)
    xs = {
        "strided": torch.randn(5, 2 * D, dtype=torch.float64, device=DEVICE)[:, ::2],
        "transposed": torch.randn(D, 5, dtype=torch.float64, device=DEVICE).T,
        "batch dims": torch.randn(2, 3, D, dtype=torch.float64, device=DEVICE),
        "empty": torch.randn(0, D, dtype=torch.float64, device=DEVICE),
        "empty batch dims": torch.randn(2, 0, D, dtype=torch.float64, device=DEVICE),
    }
    for what, x in xs.items():
        y = rec.apply(x, w, n=n, bias=b, backend=backend)
        assert y.shape == (3, *x.shape[:-1], n), what
        assert_close(y, expected(rec, x, w, n, b))
        y1 = rec.apply(x, w[1], n=n, backend=backend)   # one channel: no channel dim
        assert y1.shape == (*x.shape[:-1], n), what
        assert_close(y1, y[1] - b)


def check_grads_match_reference(rec, n: int, D: int, batch: int, backend: str, dtype):
    """Gradients of apply (x, w, bias) and of build (w) on ``backend`` in ``dtype`` against the torch
    reference's autograd in float64, from the same inputs rounded to ``dtype``."""
    f64 = dict(dtype=torch.float64, device=DEVICE)
    w, x, b = torch.randn(2, rec.calculate_l(n, D), **f64), torch.randn(batch, D, **f64), torch.randn(n, **f64)
    dy, dW = torch.randn(2, batch, n, **f64), torch.randn(2, n, D, **f64)

    def grads(cast, backend):
        w1, x1, b1 = (t.to(cast).requires_grad_() for t in (w.to(dtype), x.to(dtype), b.to(dtype)))
        y = rec.apply(x1, w1, n=n, bias=b1, backend=backend)
        gx, gw, gb = torch.autograd.grad(y, (x1, w1, b1), dy.to(dtype).to(cast))
        W = rec(w=w1, n=n, D=D, backend=backend)
        return gx, gw, gb, torch.autograd.grad(W, w1, dW.to(dtype).to(cast))[0]

    for got, expected in zip(grads(dtype, backend), grads(torch.float64, "torch")):
        assert got.dtype == dtype
        assert_close(got, expected, dtype)


@pytest.fixture(params=["torch's OpenMP", "own threads"])
def runtime(request):
    """The CPU library's threads: torch's OpenMP team (as loaded), or threads it starts itself."""
    from tinyrecon import cpu_lib
    if cpu_lib.load_error():
        pytest.skip(cpu_lib.load_error())
    lib = cpu_lib._load()[0]
    if request.param == "own threads":
        lib.tinyrecon_cpu_use_openmp(None)
    elif cpu_lib.torch_openmp() is None:
        pytest.skip("torch runs without OpenMP here")
    yield
    lib.tinyrecon_cpu_use_openmp(cpu_lib.torch_openmp())


def isa_levels() -> list:
    """-march levels this CPU can run (x86-64 with GCC only: elsewhere the CPU library has no clones)."""
    import platform
    import shutil
    if platform.machine() != "x86_64" or not shutil.which("g++"):
        return []
    flags = open("/proc/cpuinfo").read()
    return ["x86-64"] + ["x86-64-v3"] * ("avx2" in flags) + ["x86-64-v4"] * ("avx512f" in flags)
