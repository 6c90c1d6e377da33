"""torch.compile(fullgraph=True) traces every function's apply and build on the torch backend.

Kernel backends have their own compile tests beside their kernels (tests/test_<family>.py).
"""
import pytest
import torch

import tinyrecon as tr
from test_api import ALL, make


@ALL
def test_fullgraph_forward_and_backward(cls):
    torch._dynamo.reset()   # one code object compiled per class: stay under the recompile limit
    rec = make(cls, **({"seed": 7} if "seed" in cls.__init__.__code__.co_varnames else {}))
    n, D = 4, 6
    w = torch.randn(2, rec.calculate_l(n, D), requires_grad=True)
    b = torch.randn(n, requires_grad=True)
    x = torch.randn(3, D)

    def f(x):
        return rec.apply(x, w, n=n, bias=b, backend="torch").sum() + rec(n=n, D=D, w=w).sum()

    expected = f(x)
    grads = torch.autograd.grad(expected, (w, b), allow_unused=True)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, expected)
    for g, e in zip(torch.autograd.grad(got, (w, b), allow_unused=True), grads):
        assert (g is None and e is None) or torch.allclose(g, e, atol=1e-5)


def test_inductor_compiles_the_mnist_layer_shape_family():
    rec = tr.dual_lphm_reconciliation(p=2, q=4, r=2)
    w = torch.randn(rec.calculate_l(6, 16))
    x = torch.randn(5, 16)
    torch.testing.assert_close(torch.compile(lambda x: rec.apply(x, w, n=6), fullgraph=True)(x),
                               rec.apply(x, w, n=6))


def test_kron_core_traces_with_gradients_for_x_and_w():
    """The Kronecker core (a custom autograd.Function) compiles with every gradient it computes."""
    rec = tr.dual_lphm_reconciliation(p=2, q=32, r=1)
    n, D = 4, 2048
    w = torch.randn(rec.calculate_l(n, D), requires_grad=True)
    x = torch.randn(5, D, requires_grad=True)

    def f(x):
        return rec.apply(x, w, n=n).square().sum()

    expected = torch.autograd.grad(f(x), (x, w))
    got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(x), (x, w))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_kron_with_rank_one_factors_compiles(backend):
    """Rank-1 factors make size-1 dims whose strides fake tensors may guess differently from real
    ones; the apply's final reshape must stay valid (it failed at run time with einsum)."""
    from tinyrecon import dispatch
    if dispatch.why_not(backend, "kron_apply", "cpu"):
        pytest.skip(dispatch.why_not(backend, "kron_apply", "cpu"))
    torch._dynamo.reset()
    rec = tr.dual_lphm_reconciliation(p=2, q=3, r=1)
    w = torch.randn(2, rec.calculate_l(6, 12), requires_grad=True)
    b = torch.randn(6, requires_grad=True)

    def f(x):
        return rec.apply(x, w, n=6, bias=b, backend=backend).relu().mean(0)

    x = torch.randn(5, 12)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, f(x))
    for g, e in zip(torch.autograd.grad(got.sum(), (w, b)), torch.autograd.grad(f(x).sum(), (w, b))):
        torch.testing.assert_close(g, e)
