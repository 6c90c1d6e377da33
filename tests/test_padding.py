"""Padding family: duplicated_padding and duplicated_diagonal_padding, every backend vs a direct construction."""
import pytest
import torch

import tinyrecon as tr
from tinyrecon import dispatch
from conftest import DEVICE, DTYPES, assert_close, backends_for, check_apply_layouts, check_compiles_to_one_op, check_grads_match_reference

# (kind, op prefix): kind picks the class and layout; the op is what the backend column must provide.
KINDS = {
    "kron": (tr.duplicated_padding_reconciliation, "kron", "duplicated_padding"),
    "tinybig": (tr.duplicated_padding_reconciliation, "tinybig", "duplicated_padding"),
    "diag": (tr.duplicated_diagonal_padding_reconciliation, "kron", "duplicated_diagonal_padding"),
}
# (n, D, p, q): s = n/p and t = D/q odd, p < q and p > q, p = q = n, blocks wider than 16 (s = 20, t = 19).
SHAPES = [(15, 14, 3, 2), (6, 20, 2, 4), (20, 6, 4, 2), (5, 5, 5, 5), (9, 9, 3, None), (40, 36, 2, 3), (21, 38, 3, 2)]


def dense(kind, B, p, q):
    """W built directly from its definition (docs/functions.md), B of shape (s, t)."""
    if kind == "kron":
        return torch.kron(torch.ones(p, q, dtype=B.dtype), B)
    if kind == "diag":
        return torch.kron(torch.eye(p, q, dtype=B.dtype), B)
    s, t = B.shape   # tinyBIG 0.2.1: reshape(outer(ones(p*q), vec(B)), n, D)
    return torch.outer(torch.ones(p * q, dtype=B.dtype), B.flatten()).reshape(p * s, q * t)


def make(kind, p, q, **kw):
    cls, layout, _ = KINDS[kind]
    return cls(p=p, q=q, layout=layout, **kw)


def each(kind_list=KINDS):
    """(kind, backend) pairs; a backend that cannot run the kind's op is a skip with its reason."""
    return [pytest.param(k, *b.values, marks=b.marks, id=f"{k}-{b.id}")
            for k in kind_list for b in backends_for(KINDS[k][2] + "_apply")]


@pytest.mark.parametrize("kind,backend", each())
@pytest.mark.parametrize("n,D,p,q", SHAPES)
def test_build_matches_definition(kind, backend, n, D, p, q):
    rec = make(kind, p, q)
    qq = p if q is None else q
    w = torch.randn(3, rec.calculate_l(n, D), dtype=torch.float64, device=DEVICE)
    W = rec(w=w, n=n, D=D, backend=backend)
    assert W.shape == (3, n, D)
    for c in range(3):
        assert torch.equal(W[c].cpu(), dense(kind, w[c].reshape(n // p, D // qq).cpu(), p, qq))


@pytest.mark.parametrize("n,D,p,q", [(6, 12, 2, 2), (6, 12, 6, 3), (6, 12, 3, 1), (6, 4, 3, 4)])
def test_layouts_agree_iff_s_or_q_is_one(n, D, p, q):
    w = torch.randn(tr.duplicated_padding_reconciliation(p=p, q=q).calculate_l(n, D), dtype=torch.float64)
    Wk = make("kron", p, q)(w=w, n=n, D=D)
    Wt = make("tinybig", p, q)(w=w, n=n, D=D)
    assert torch.equal(Wk, Wt) == (n == p or q == 1)


def test_calculate_l():
    assert tr.duplicated_padding_reconciliation(p=2, q=2).calculate_l(6, 12) == 18   # docs/functions.md
    assert tr.duplicated_padding_reconciliation(p=2).calculate_l(6, 12) == 18        # q=None means q=p
    assert tr.duplicated_padding_reconciliation(p=3).calculate_l(6, 12) == 2 * 4
    assert tr.duplicated_padding_reconciliation(p=2, q=3).calculate_l(6, 12) == 3 * 4
    assert tr.duplicated_diagonal_padding_reconciliation(p=6, q=12).calculate_l(6, 12) == 1
    assert tr.duplicated_diagonal_padding_reconciliation(p=2).calculate_l(6, 12) == 18


def _inputs(n, D, dtype, batch):
    x = torch.randn(*batch, D, dtype=torch.float64, device=DEVICE).to(dtype)
    b = torch.randn(n, dtype=torch.float64, device=DEVICE).to(dtype)
    return x, b


def _expected(rec, x, w, n, b):
    """x @ W^T + b in float64 from the same (rounded) inputs, W from the torch reference build."""
    W = rec(w=w.double(), n=n, D=x.shape[-1], backend="torch")
    y = torch.einsum("...d,cnd->c...n", x.double(), W.reshape(-1, *W.shape[-2:])) + b.double()
    return y if W.dim() == 3 else y[0]


@pytest.mark.parametrize("kind,backend", each())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,D,p,q", [(15, 14, 3, 2), (20, 6, 4, 2), (6, 20, 2, 4), (40, 36, 2, 3), (21, 38, 3, 2)])
def test_apply_matches_dense(kind, backend, dtype, n, D, p, q):
    rec = make(kind, p, q)
    w = torch.randn(rec.calculate_l(n, D), dtype=torch.float64, device=DEVICE).to(dtype)
    x, b = _inputs(n, D, dtype, batch=(37,))
    y = rec.apply(x, w, n=n, bias=b, backend=backend)
    assert y.shape == (37, n) and y.dtype == dtype
    assert_close(y, _expected(rec, x, w, n, b), dtype)


@pytest.mark.parametrize("kind,backend", each())
def test_apply_layouts_of_x_and_channels(kind, backend):
    check_apply_layouts(make(kind, 3, 2), 15, 14, backend, _expected)



@pytest.mark.parametrize("kind,backend", each())
def test_gradcheck(kind, backend):
    n, D, p, q = 6, 10, 3, 2
    rec = make(kind, p, q)
    opts = dict(dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(2, rec.calculate_l(n, D), **opts)
    x = torch.randn(3, D, **opts)
    b = torch.randn(n, **opts)
    fast = backend != "torch"   # a random directional derivative: few calls of the (slow) interpreter
    assert torch.autograd.gradcheck(lambda w: rec(w=w, n=n, D=D, backend=backend), (w,), fast_mode=fast)
    assert torch.autograd.gradcheck(lambda x, w, b: rec.apply(x, w, n=n, bias=b, backend=backend), (x, w, b),
                                    fast_mode=fast)


@pytest.mark.parametrize("kind,backend", each())
def test_grads_of_empty_batch(kind, backend):
    n, D, p, q = 6, 10, 3, 2
    rec = make(kind, p, q)
    w = torch.randn(rec.calculate_l(n, D), device=DEVICE, requires_grad=True)
    b = torch.randn(n, device=DEVICE, requires_grad=True)
    rec.apply(torch.randn(0, D, device=DEVICE), w, n=n, bias=b, backend=backend).sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("kind", KINDS)
def test_errors(kind):
    with pytest.raises(ValueError, match=r"p=4 must be a positive divisor of n=6; divisors of 6: \[1, 2, 3, 6\]"):
        make(kind, 4, 2)(w=torch.randn(18), n=6, D=12)
    with pytest.raises(ValueError, match=r"q=5 must be a positive divisor of D=12; divisors of 12"):
        make(kind, 2, 5).apply(torch.randn(2, 12), torch.randn(18), n=6)
    with pytest.raises(ValueError, match=r"l = s\*t = 3\*6 = 18; got \(17,\)"):
        make(kind, 2, None)(w=torch.randn(17), n=6, D=12)
    with pytest.raises(ValueError, match=r"l = s\*t = 2\*3 = 6; got \(2, 18\)"):
        make(kind, 3, 4).apply(torch.randn(2, 12), torch.randn(2, 18), n=6)


# ---- the Triton (and CUDA) kernels against the torch reference ------------------------------------
def fused(kind_list=KINDS):
    return [p for p in each(kind_list) if not p.id.endswith("-torch")]


@pytest.mark.parametrize("kind,backend", fused())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,D,p,q", [(21, 38, 3, 2), (20, 6, 4, 2), (6, 20, 2, 4)])
def test_grads_match_reference(kind, backend, dtype, n, D, p, q):
    """Backward kernels (x, B, bias; build's B) vs the reference's autograd in float64."""
    check_grads_match_reference(make(kind, p, q), n, D, 37, backend, dtype)



@pytest.mark.parametrize("kind,backend", fused())
def test_torch_compile_sees_one_op(kind, backend):
    if (kind, backend) == ("tinybig", "cpu"):
        pytest.skip("the CPU library has no kernel for layout='tinybig': the torch reference runs it")
    check_compiles_to_one_op(make(kind, 3, 2), 15, 14, backend)


@pytest.mark.parametrize("backend", backends_for("duplicated_padding_apply"))
def test_fp16_block_sums_do_not_overflow(backend):
    """duplicated_padding sums x's q column blocks before the GEMM: 300 blocks of 250 sum to 75,000,
    over fp16's 65,504, while y (and dB) stay small; the sum must stay fp32 until the dot."""
    rec = tr.duplicated_padding_reconciliation(p=1, q=300)
    x = torch.full((3, 600), 250.0, device=DEVICE, dtype=torch.float16)
    w = torch.full((1, rec.calculate_l(2, 600)), 1e-3, device=DEVICE, dtype=torch.float16, requires_grad=True)
    y = rec.apply(x, w, n=2, backend=backend)
    y_ref = rec.apply(x.double(), w.double(), n=2, backend="torch")
    assert torch.isfinite(y).all()
    assert_close(y, y_ref, torch.float16)
    (gw,) = torch.autograd.grad(y.sum() * 1e-3, w)   # dB: x's block sums against dy's
    (gw_ref,) = torch.autograd.grad(y_ref.sum() * 1e-3, w)
    assert torch.isfinite(gw).all()
    assert_close(gw, gw_ref, torch.float16)


# ---- the CPU library's chain: duplicated_padding's layout="kron" -------------------------------
needs_cpu_library = pytest.mark.skipif(bool(dispatch.why_not("cpu", "duplicated_padding_apply", "cpu")),
                                       reason="no CPU library here")


@needs_cpu_library
@pytest.mark.parametrize("dtype,r_dtype", [(torch.float32, None), (torch.float64, None), (torch.bfloat16, None),
                                           (torch.bfloat16, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("N,M,K,RA,RB", [(3, 2, 7, 1, 3), (5, 3, 4099, 1, 32), (2, 4, 140001, 1, 7),
                                         (37, 5, 1031, 3, 13), (0, 2, 9, 1, 3), (2, 1, 33, 1, 1)])
def test_cpu_chain_matches_its_definition(N, M, K, RA, RB, dtype, r_dtype):
    """``core[b] = L @ X[b] @ R^T``: short tiles, K blocks and tails, K split over threads (x of 1.1M
    elements), an empty batch, a non-contiguous x; a bfloat16 x is read as is with a float32 L and a
    float32 or (read as is) bfloat16 R."""
    from tinyrecon import cpu_ops
    fdt = torch.float32 if dtype == torch.bfloat16 else dtype
    x = torch.randn(N, M, 2 * K, dtype=fdt).to(dtype)[..., ::2]
    L, R = torch.randn(RA, M, dtype=fdt), torch.randn(RB, K, dtype=fdt).to(r_dtype or fdt)
    core = cpu_ops.kron_chain.op(x, L, R)   # the custom op (torch.compile's); applies call its eager body
    assert core.shape == (N, RA, RB) and core.dtype == fdt
    assert_close(core, L.double() @ x.double() @ R.double().T, fdt)


@needs_cpu_library
@pytest.mark.parametrize("dtype,r_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)], ids=str)
def test_cpu_chain_op_opcheck(dtype, r_dtype):
    """The chain's custom op (what torch.compile traces): schema, fake kernel, dispatch."""
    from tinyrecon import cpu_ops
    x = torch.randn(5, 3, 7).to(dtype)
    torch.library.opcheck(cpu_ops.kron_chain.op, (x, torch.ones(1, 3), torch.randn(4, 7).to(r_dtype)))


def _library_calls(monkeypatch):
    from tinyrecon import cpu_lib
    calls = []
    real_call = cpu_lib.call
    monkeypatch.setattr(cpu_lib, "call", lambda name, *a: calls.append((name.rsplit("_", 1)[-1], a[0])) or
                        real_call(name, *a))
    return calls


@needs_cpu_library
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_cpu_duplicated_padding_kron_runs_the_chain(dtype, monkeypatch):
    """layout="kron" on the cpu backend: the forward is the chain (a bfloat16 x read as is, code 2),
    dB one pass over x, dx one expand; values and gradients match the torch backend.
    layout="tinybig", q = 1 (no blocks to sum) and more than 32 rows of B keep the reference's path."""
    calls = _library_calls(monkeypatch)
    n, D, batch = 12, 3 * 1001, 37
    x = torch.randn(batch, 2 * D, dtype=torch.float64)[:, ::2].to(dtype)   # not contiguous
    code = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}[dtype]
    for rec, channels, chained in ((tr.duplicated_padding_reconciliation(p=2, q=3), 2, True),
                                   (tr.duplicated_padding_reconciliation(p=2, q=3, layout="tinybig"), 2, False),
                                   (tr.duplicated_padding_reconciliation(p=2, q=1), 2, False),
                                   (tr.duplicated_padding_reconciliation(p=1, q=3), 3, False)):   # 3 x 12 rows of B
        w = torch.randn(channels, rec.calculate_l(n, D), dtype=torch.float64).to(dtype).requires_grad_()
        b = torch.randn(n, dtype=torch.float64).to(dtype).requires_grad_()
        calls.clear()
        y = rec.apply(x, w, n=n, bias=b, backend="cpu")
        assert (("chain", code) in calls) == chained and all(c < 4 for _, c in calls)
        if dtype == torch.bfloat16:   # a bfloat16 B that needs no gradient is read as is too (code 3)
            calls.clear()
            y_nograd = rec.apply(x, w.detach(), n=n, bias=b.detach(), backend="cpu")
            assert (("chain", 3) in calls) == chained
            assert torch.equal(y_nograd, y)
        y_ref = rec.apply(x.double(), w.double(), n=n, bias=b.double(), backend="torch")
        assert_close(y, y_ref, dtype)
        g = torch.randn_like(y)
        calls.clear()
        grads = torch.autograd.grad(y, (w, b), g)
        assert not chained or calls == [("pass", code)]   # dB: one pass over x
        for a, e in zip(grads, torch.autograd.grad(y_ref, (w, b), g.double())):
            assert_close(a, e, dtype)
    if dtype != torch.bfloat16:   # (a bfloat16 x that needs its gradient is copied to float32)
        rec = tr.duplicated_padding_reconciliation(p=2, q=3)
        xg = x.detach().requires_grad_()
        w = torch.randn(rec.calculate_l(n, D), dtype=dtype, requires_grad=True)
        y = rec.apply(xg, w, n=n, backend="cpu")
        calls.clear()
        grads = torch.autograd.grad(y, (xg, w), torch.ones_like(y))
        assert sorted(calls) == [("expand", code), ("pass", code)]   # dx written once, dB one pass
        y_ref = rec.apply(xg.double(), w.double(), n=n, backend="torch")
        for a, e in zip(grads, torch.autograd.grad(y_ref, (xg, w), torch.ones_like(y_ref))):
            assert_close(a, e, dtype)


def test_cpu_chain_pays_where_measured(monkeypatch):
    """The chain takes duplicated_padding's kron layout at kernel sizes with blocks to sum and at
    most 32 rows of B (the MNIST layer: x 64 x 615,440, p = q = 2, B 32 x 307,720)."""
    from tinyrecon import cpu_ops
    monkeypatch.setattr(cpu_ops, "_MIN_ELEMENTS", 1 << 20)
    mnist = torch.empty(64, 1).expand(64, 615440)   # its size, without the memory
    assert cpu_ops._chain_pays(mnist, 2, 32)
    assert not cpu_ops._chain_pays(mnist, 1, 32)            # nothing to sum: the reference's one GEMM
    assert not cpu_ops._chain_pays(mnist, 2, 33)
    assert not cpu_ops._chain_pays(mnist[:1, :1 << 19], 2, 32)   # x below 1M elements
