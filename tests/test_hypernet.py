"""Hypernet family (hypernet, random_matrix_hypernet): W from docs/functions.md, apply, gradients, seeds, slices."""
import io

import pytest
import torch

import tinyrecon as tr
from tinyrecon import _random
from tinyrecon.functions import hypernet as hypernet_module
from conftest import DEVICE, DTYPES, assert_close, backends_for, check_compiles_to_one_op

HN, RMH = tr.hypernet_reconciliation, tr.random_matrix_hypernet_reconciliation
SMALL = dict(l=5, hidden_dim=4)

# n, D, batch, C: odd sizes, a single element, channels, empty batch; the last two cross the
# interpreter's 16-wide tiles of n and D, and rows of x in several chunks.
CASES = [(5, 7, (4,), 1), (1, 1, (2, 3), 1), (4, 6, (0,), 2), (17, 3, (3,), 3), (3, 18, (37,), 1)]
CLS_BACKENDS = [pytest.param(cls, p.values[0], marks=p.marks, id=f"{short}-{p.id}")
                for cls, short, op in ((HN, "hypernet", "hypernet_apply"), (RMH, "rmh", "random_matrix_hypernet_apply"))
                for p in backends_for(op)]


def make(cls, seed=3, **kw):
    return cls(**SMALL, seed=seed, **kw) if cls is HN else cls(r=2, **SMALL, seed=seed, **kw)


def direct_W(rec, w, n, D):
    """W of docs/functions.md built the obvious way (w: (C, l)), as (C, n, D)."""
    h = rec.hidden_dim
    if isinstance(rec, HN):
        W1, b1 = rec.first_layer(w)
        W2 = _random.randn(rec.stream_seed(2), (n * D, h), dtype=w.dtype)
        b2 = _random.randn(rec.stream_seed(3), (n * D,), dtype=w.dtype)
        return torch.stack([(W2 @ torch.sigmoid(W1 @ wc + b1) + b2).reshape(n, D) for wc in w])
    P, Q, S = rec.small_matrices(w)
    T = _random.randn(rec.stream_seed(3), (n * D, rec.r), dtype=w.dtype)
    return torch.stack([(((torch.sigmoid((wc @ P) @ Q.T)) @ S) @ T.T).reshape(n, D) for wc in w])


def tol_dtype(dtype, backend):
    # Triton draws normals with its own libm (Box-Muller): ~1e-6 from torch's, so float64
    # results can only match the torch reference to float32 accuracy.
    return torch.float32 if backend == "triton" and dtype == torch.float64 else dtype


def test_calculate_l():
    assert HN(l=64).calculate_l(6, 12) == 64
    assert RMH(l=10, r=3).calculate_l(64, 615440) == 10


def test_first_layer_and_small_matrices_come_from_the_seed():
    rec = HN(**SMALL, seed=7)
    W1, b1 = rec.first_layer(torch.empty(0))
    assert torch.equal(W1, _random.randn(rec.stream_seed(0), (4, 5)))
    assert torch.equal(b1, _random.randn(rec.stream_seed(1), (4,)))
    rmh = RMH(r=2, **SMALL, seed=7)
    P, Q, S = rmh.small_matrices(torch.empty(0))
    for i, (M, shape) in enumerate(((P, (5, 2)), (Q, (4, 2)), (S, (4, 2)))):
        assert torch.equal(M, _random.randn(rmh.stream_seed(i), shape))


@pytest.mark.parametrize("cls,backend", CLS_BACKENDS)
@pytest.mark.parametrize("n,D,batch,C", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_build_and_apply(cls, backend, n, D, batch, C, dtype):
    torch.manual_seed(0)
    rec = make(cls)
    w = torch.randn(C, rec.calculate_l(n, D), dtype=torch.float64, device=DEVICE).to(dtype)
    x = torch.randn(*batch, 2 * D, dtype=torch.float64, device=DEVICE).to(dtype)[..., ::2]   # non-contiguous
    bias = torch.randn(n, dtype=torch.float64, device=DEVICE).to(dtype)
    W64 = direct_W(rec, w.double(), n, D)
    expected = torch.einsum("...d,cnd->c...n", x.double(), W64) + bias.double()
    tol = tol_dtype(dtype, backend)
    keep = (lambda t: t) if C > 1 else (lambda t: t[0])
    W = rec(w=w, n=n, D=D, backend=backend)
    assert W.dtype == dtype and W.shape == keep(W64).shape
    assert_close(W, keep(W64), tol)
    y = rec.apply(x, w, n=n, bias=bias, backend=backend)
    assert y.dtype == dtype and y.shape == keep(expected).shape
    assert_close(y, keep(expected), tol)
    assert_close(rec.apply(x, w, n=n, backend=backend), keep(expected - bias.double()), tol)


@pytest.mark.parametrize("cls,backend", CLS_BACKENDS)
def test_gradcheck(cls, backend):
    torch.manual_seed(0)
    n, D, C = 2, 3, 2
    rec = cls(l=3, hidden_dim=2, seed=5) if cls is HN else cls(l=3, hidden_dim=4, r=2, seed=5)
    opts = dict(dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(C, rec.calculate_l(n, D), **opts)
    x = torch.randn(2, D, **opts)
    bias = torch.randn(n, **opts)
    fast = backend != "torch"    # one random direction per input: the interpreter is slow
    assert torch.autograd.gradcheck(lambda w: rec(w=w, n=n, D=D, backend=backend), (w,), fast_mode=fast)
    assert torch.autograd.gradcheck(lambda x, w, b: rec.apply(x, w, n=n, bias=b, backend=backend), (x, w, bias),
                                    fast_mode=fast)


@pytest.mark.parametrize("cls,backend", [p for p in CLS_BACKENDS if p.values[1] != "torch"])
@pytest.mark.parametrize("n,D,batch,C", CASES[3:])
def test_gradients_match_reference(cls, backend, n, D, batch, C):
    """Gradients of x, w, bias (fp32) against the torch reference's autograd, over tile edges."""
    torch.manual_seed(1)
    rec = make(cls)
    x = torch.randn(*batch, D, device=DEVICE)
    w = torch.randn(C, rec.calculate_l(n, D), device=DEVICE)
    bias = torch.randn(n, device=DEVICE)
    keep = (lambda t: t) if C > 1 else (lambda t: t[0])
    dy = keep(torch.randn(C, *batch, n, device=DEVICE))
    dW = keep(torch.randn(C, n, D, device=DEVICE))
    grads = {}
    for b in ("torch", backend):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, bias))
        y = rec.apply(xs, ws, n=n, bias=bs, backend=b)
        W = rec(w=ws, n=n, D=D, backend=b)
        torch.autograd.backward((y, W), (dy, dW))
        grads[b] = (xs.grad, ws.grad, bs.grad)
    for got, want in zip(grads[backend], grads["torch"]):
        assert_close(got, want)


@pytest.mark.parametrize("cls", [HN, RMH])
def test_slices_give_the_same_W(cls, monkeypatch):
    n, D = 7, 5
    rec = make(cls)
    w = torch.randn(2, rec.calculate_l(n, D), dtype=torch.float64)
    x = torch.randn(3, D, dtype=torch.float64)
    W, y = rec(w=w, n=n, D=D, backend="torch"), rec.apply(x, w, n=n, backend="torch")
    monkeypatch.setattr(hypernet_module, "_SLICE", 11)   # 1 or 2 rows of W per slice
    assert hypernet_module._rows_per_slice(D, rec.hidden_dim if cls is HN else rec.r) < n
    assert_close(rec(w=w, n=n, D=D, backend="torch"), W)
    assert_close(rec.apply(x, w, n=n, backend="torch"), y)


@pytest.mark.parametrize("cls", [HN, RMH])
def test_seeds(cls):
    n, D = 5, 7
    a = make(cls, seed=21)
    w = torch.randn(a.calculate_l(n, D))
    W = a(w=w, n=n, D=D)
    assert torch.equal(W, make(cls, seed=21)(w=w, n=n, D=D))        # same seed, same W
    assert not torch.equal(W, make(cls, seed=22)(w=w, n=n, D=D))    # another seed, another W
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make(cls, seed=99)
    b.load_state_dict(torch.load(buf))
    assert torch.equal(b(w=w, n=n, D=D), W)                          # round trip to a fresh instance
    assert torch.equal(a.to(torch.float64).to("cpu")(w=w, n=n, D=D), W)   # .to() keeps the seed


@pytest.mark.parametrize("cls", [HN, RMH])
def test_static_matrices_are_frozen(cls):
    rec = make(cls)
    assert list(rec.parameters()) == []
    w = torch.randn(5, requires_grad=True)
    rec(w=w, n=4, D=3).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_trainable_hypernet():
    n, D = 4, 6
    rec = HN(**SMALL, static=False, seed=8)
    w = torch.randn(5, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"setup\(n=4, D=6\)"):
        rec(w=w, n=n, D=D)
    with pytest.raises(RuntimeError, match="setup"):
        rec.apply(torch.randn(2, D), w, n=n)
    rec.setup(n, D)
    params = list(rec.parameters())
    assert len(params) == 4                                           # W1, b1, W2, b2
    W = rec(w=w, n=n, D=D)
    assert_close(W, HN(**SMALL, seed=8)(w=w, n=n, D=D))               # starts at the static function
    x = torch.randn(3, D)
    assert_close(rec.apply(x, w, n=n), x @ W.T)
    (rec.apply(x, w, n=n) ** 2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert w.grad is not None


triton_only = pytest.mark.skipif(bool(tr.dispatch.why_not("triton", "random_matrix_hypernet_apply", torch.device(DEVICE).type)),
                                 reason="Triton cannot run here")


@triton_only
def test_in_kernel_matrix_equals_torch_philox():
    from tinyrecon.kernels import hypernet  # noqa: F401  (registers the Triton ops)
    build, apply = (tr.ops.OPS[f"random_matrix_hypernet_{op}"].impls["triton"] for op in ("build", "apply"))
    n, D, k = 5, 7, 3
    seed_m, seed_c = 2**62 + 11, 123
    M = _random.randn(seed_m, (n * D, k), device=DEVICE)
    # Box-Muller runs on each side's libm: equal to ~1 ulp of the log/cos, not bit for bit.
    exact = dict(rtol=0, atol=2e-6)
    # v = e_c: channel c of the build is column c of M.
    W = build(torch.eye(k, device=DEVICE), seed_m, n, D)
    torch.testing.assert_close(W.reshape(k, n * D).T, M, **exact)
    W0 = tr.ops.OPS["hypernet_build"].impls["triton"](torch.zeros(1, k, device=DEVICE), seed_m, seed_c, n, D)
    torch.testing.assert_close(W0.reshape(-1), _random.randn(seed_c, (n * D,), device=DEVICE), **exact)
    # x = I: the apply kernel's y[c] is W_c^T, drawn by the apply kernel itself.
    y = apply(torch.eye(D, device=DEVICE), torch.eye(k, device=DEVICE), seed_m, n, None)
    torch.testing.assert_close(y, W.transpose(1, 2), **exact)


@triton_only
@pytest.mark.parametrize("cls", [HN, RMH])
def test_torch_compile_sees_one_op(cls):
    check_compiles_to_one_op(cls(r=2, l=3, hidden_dim=4, seed=2) if cls is RMH else cls(l=3, hidden_dim=4, seed=2),
                             4, 6, "triton", channels=1)


@pytest.mark.parametrize("cls", [HN, RMH])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs_round_the_small_vector_once(cls, dtype):
    """fp16/bf16 w: the frozen small matrices and the chain to hvec / z run in fp32 and are rounded
    once, so apply stays within the dtype's tolerance of float64 for every seed (with the matrices
    drawn in bf16, about 1 seed in 60 missed it)."""
    n, D = 4, 6
    for seed in range(120):
        rec = cls(seed=seed)   # tinyBIG's default sizes: l = 64, hidden_dim = 128
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(rec.calculate_l(n, D), dtype=torch.float64, generator=gen).to(dtype)
        x = torch.randn(3, D, dtype=torch.float64, generator=gen).to(dtype)
        expected = x.double() @ rec(w=w.double(), n=n, D=D).T
        assert_close(rec.apply(x, w, n=n, backend="torch"), expected, dtype)
