"""torch.autocast: apply, forward and ReconciledLinear follow the autocast dtype as F.linear does.

Under autocast F.linear casts x, its weight and bias to the autocast dtype and computes in it;
tinyrecon's entry points (``Reconciliation.apply`` / ``forward``) do the same for every function
and backend. Checked here on this machine's device: bfloat16 on CPU; float16 and bfloat16 on CUDA.
"""
import pytest
import torch
import torch.nn.functional as F

import tinyrecon as tr
from conftest import DEVICE, assert_close
from test_api import ALL, make

DTYPES = [torch.bfloat16] if DEVICE == "cpu" else [torch.float16, torch.bfloat16]
BACKENDS = [b for b in tr.dispatch.BACKENDS if tr.dispatch.accepts(b, DEVICE)]   # torch first


def seeded(cls):
    return make(cls, **({"seed": 7} if "seed" in cls.__init__.__code__.co_varnames else {}))


def inputs(rec, n, D, channels=2):
    torch.manual_seed(0)
    f32 = dict(device=DEVICE, dtype=torch.float32)
    return (torch.randn(3, D, **f32), torch.randn(channels, rec.calculate_l(n, D), **f32, requires_grad=True),
            torch.randn(n, **f32, requires_grad=True))


def reference(rec, x, w, b, n, dtype):
    """The float32 torch reference on the inputs rounded to ``dtype`` (what autocast feeds F.linear)."""
    r = [t.detach().to(dtype).float() for t in (x, w, b)]
    return rec.apply(r[0], r[1], n=n, bias=r[2], backend="torch")


@ALL
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply_and_forward_follow_autocast(cls, backend, dtype):
    rec, (n, D) = seeded(cls), (6, 12)
    x, w, b = inputs(rec, n, D)
    reason = tr.dispatch.why_not(backend, None, DEVICE)
    if reason:
        pytest.skip(reason)
    with torch.autocast(DEVICE, dtype=dtype):
        try:
            y = rec.apply(x, w, n=n, bias=b, backend=backend)
        except tr.BackendUnavailable as e:    # no kernel for this function on that backend
            pytest.skip(str(e))
        W = rec(n=n, D=D, w=w, backend=backend)
        dense = F.linear(x, rec(n=n, D=D, w=w[0].detach()), b.detach())
    assert y.dtype == W.dtype == dense.dtype == dtype
    assert_close(y, reference(rec, x, w, b, n, dtype), dtype)
    assert_close(W, rec(n=n, D=D, w=w.detach().to(dtype).float()), dtype)
    if w.shape[1]:   # gradients reach the float32 parameters in float32, as with F.linear
        gw, gb = torch.autograd.grad(y.float().sum(), (w, b))
        assert gw.dtype == gb.dtype == torch.float32


def test_disabled_autocast_changes_nothing():
    rec = tr.hm_reconciliation()
    x, w = torch.randn(2, 12, device=DEVICE), torch.randn(18, device=DEVICE)
    with torch.autocast(DEVICE, dtype=DTYPES[0], enabled=False):
        assert rec.apply(x, w, n=6).dtype == rec(n=6, D=12, w=w).dtype == torch.float32


def test_integer_input_is_still_an_error_under_autocast():
    with torch.autocast(DEVICE, dtype=DTYPES[0]), pytest.raises(TypeError, match="floating-point"):
        tr.hm_reconciliation().apply(torch.randn(2, 12, device=DEVICE), torch.arange(18, device=DEVICE), n=6)


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_follows_autocast_like_nn_linear(channels, dtype):
    torch.manual_seed(0)
    layer = tr.ReconciledLinear(12, 6, "dual_lphm", channels=channels).to(DEVICE)
    x = torch.randn(4, 12, device=DEVICE)
    with torch.autocast(DEVICE, dtype=dtype):
        y = layer(x)
        dense = F.linear(x, layer.weight.detach().float(), layer.bias.detach())
        assert layer.weight.dtype == dtype
    assert y.dtype == dense.dtype == dtype
    assert_close(y, F.linear(x.to(dtype).float(), layer.weight.detach().to(dtype).float(),
                             layer.bias.detach().to(dtype).float()), dtype)
    y.float().sum().backward()
    assert layer.w.grad.dtype == layer.bias.grad.dtype == torch.float32


@ALL
def test_compile_fullgraph_under_autocast(cls):
    torch._dynamo.reset()   # one code object compiled per class: stay under the recompile limit
    rec, (n, D), dtype = seeded(cls), (4, 6), DTYPES[0]
    x, w, b = inputs(rec, n, D)

    def f(x):
        with torch.autocast(DEVICE, dtype=dtype):
            return rec.apply(x, w, n=n, bias=b, backend="torch"), rec(n=n, D=D, w=w)

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    for g, e in zip(got, f(x)):
        assert g.dtype == dtype
        assert_close(g, e, dtype)


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_compile_fullgraph_under_autocast_on_kernel_backends(backend):
    reason = tr.dispatch.why_not(backend, "kron_apply", DEVICE)
    if reason:
        pytest.skip(reason)
    torch._dynamo.reset()
    layer = tr.ReconciledLinear(12, 6, tr.dual_lphm_reconciliation(p=2, q=3, r=1), channels=2,
                                backend=backend).to(DEVICE)
    x, dtype = torch.randn(5, 12, device=DEVICE), DTYPES[0]

    def f(x):
        with torch.autocast(DEVICE, dtype=dtype):
            return layer(x)

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    assert got.dtype == dtype
    assert_close(got, f(x), dtype)
