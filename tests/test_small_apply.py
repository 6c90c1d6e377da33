"""Small W (n*D < base.BUILD_BELOW): ``apply`` builds W with the backend's build and makes one
F.linear, for the functions with ``build_when_small`` on the torch and cpu backends. Values and
gradients against the float64 torch reference, for every function; bad input is still refused."""
import pytest
import torch

import tinyrecon as tr
from tinyrecon import base, dispatch
from conftest import assert_close
from test_reliability import BAD, SMALL

# (n, D) with the instance of SMALL (n=4, D=6) and an odd one where every family has divisors
SIZES = {(4, 6): {}, (6, 9): {"hm": dict(p=2, q=3), "lphm": dict(p=2, q=3, r=1), "dual_lphm": dict(p=2, q=3, r=1),
                              "duplicated_padding": dict(p=2, q=3), "duplicated_diagonal_padding": dict(p=2, q=3)}}
BUILDS_SMALL = {f for f in SMALL if tr.reconciliation(f, **SMALL[f]).build_when_small}
CPU_BACKENDS = [b for b in ("torch", "cpu") if not dispatch.why_not(b, None, "cpu")]


@pytest.fixture(autouse=True)
def small_builds(monkeypatch):
    monkeypatch.setattr(base, "BUILD_BELOW", 1 << 12)


def test_every_family_with_an_apply_builds_when_small():
    assert BUILDS_SMALL == {"hm", "lphm", "dual_lphm", "lorr", "random_matrix_adaption", "duplicated_padding",
                            "duplicated_diagonal_padding", "masking", "hypernet", "random_matrix_hypernet"}


@pytest.mark.parametrize("size", list(SIZES), ids=str)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("batch", [(5,), (0,), (2, 3)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", [None] + CPU_BACKENDS)
@pytest.mark.parametrize("family", sorted(SMALL))
def test_values_and_gradients_match_the_reference(family, backend, dtype, batch, channels, size, monkeypatch):
    n, D = size
    rec = tr.reconciliation(family, **{**SMALL[family], **SIZES[size].get(family, {})})
    l = rec.calculate_l(n, D)
    structured = []
    monkeypatch.setattr(type(rec), "_apply_flat",
                        lambda self, *a, f=type(rec)._apply_flat: structured.append(1) or f(self, *a))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*batch, D, generator=gen, dtype=torch.float64)
    w = torch.randn(channels, l, generator=gen, dtype=torch.float64) if l else None
    bias = torch.randn(n, generator=gen, dtype=torch.float64)
    leaves = [t.to(dtype).requires_grad_() for t in (x, bias) + ((w,) if l else ())]
    y = rec.apply(leaves[0], leaves[2] if l else None, n=n, bias=leaves[1], backend=backend)
    assert bool(structured) != (family in BUILDS_SMALL)   # the small path is taken exactly where declared
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    W = rec(n, D, w=ref_leaves[2] if l else None, backend="torch").double()
    W = W if W.dim() == 3 else W[None]
    ref = (ref_leaves[0].reshape(-1, D) @ W.mT + ref_leaves[1]).reshape(W.shape[0], *batch, n)
    ref = ref if W.shape[0] > 1 else ref[0]
    assert y.dtype == dtype and y.shape == ref.shape == ((channels,) if channels > 1 and l else ()) + (*batch, n)
    assert_close(y, ref)
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(y, leaves, g.to(dtype), allow_unused=True, materialize_grads=True)
    ref_grads = torch.autograd.grad(ref, ref_leaves, g, allow_unused=True, materialize_grads=True)
    for a, e in zip(grads, ref_grads):
        assert_close(a, e, dtype)


@pytest.mark.parametrize("family", sorted(BUILDS_SMALL))
def test_fp64_gradcheck_and_double_backward(family):
    rec = tr.reconciliation(family, **SMALL[family])
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, rec.calculate_l(4, 6), dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: rec.apply(x, w, n=4, bias=b)   # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b)) and torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("family", sorted(BUILDS_SMALL))
def test_big_w_keeps_the_structured_apply(family, monkeypatch):
    monkeypatch.setattr(base, "BUILD_BELOW", 24)   # n*D = 24 is not below it
    rec = tr.reconciliation(family, **SMALL[family])
    calls = []
    monkeypatch.setattr(type(rec), "_apply_flat", lambda self, *a, f=type(rec)._apply_flat: calls.append(1) or f(self, *a))
    rec.apply(torch.randn(3, 6), torch.randn(rec.calculate_l(4, 6)), n=4)
    assert calls


def test_triton_keeps_its_own_ops():
    """Triton's applies are not replaced by the build (their first-order refusals stay)."""
    if dispatch.why_not("triton", "lorr_apply", "cpu"):
        pytest.skip(dispatch.why_not("triton", "lorr_apply", "cpu"))
    assert not base._builds_small("lorr", torch.empty(1), "triton")
    with dispatch.use_backend("triton"):
        assert not base._builds_small("lorr", torch.empty(1), None)
    assert base._builds_small("lorr", torch.empty(1), "cpu") and base._builds_small("lorr", torch.empty(1), "torch")


@pytest.mark.parametrize("call, exc, phrase, backend", BAD)
def test_bad_input_is_still_refused(call, exc, phrase, backend):
    with pytest.raises(exc, match=phrase):
        call(backend)


def test_a_backend_that_cannot_run_is_still_refused():
    with pytest.raises(dispatch.BackendUnavailable, match="cuda"):
        tr.lorr_reconciliation(r=1).apply(torch.randn(3, 6), torch.randn(10), n=4, backend="cuda")


@pytest.mark.parametrize("family", sorted(BUILDS_SMALL))
def test_compiles_whole(family):
    """torch.compile(fullgraph=True) traces the small path, with the values and gradients of eager."""
    torch._dynamo.reset()   # every family compiles the same lambda: no recompile limit across them
    rec = tr.reconciliation(family, **SMALL[family])
    x, b = torch.randn(3, 6), torch.randn(4, requires_grad=True)
    w = torch.randn(2, rec.calculate_l(4, 6), requires_grad=True)
    fn = lambda x, w, b: rec.apply(x, w, n=4, bias=b)   # noqa: E731
    y = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, w, b)
    ref = fn(x, w, b)
    assert_close(y, ref)
    for a, e in zip(torch.autograd.grad(y.sum(), (w, b)), torch.autograd.grad(ref.sum(), (w, b))):
        assert_close(a, e)
