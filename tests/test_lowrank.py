"""Low-rank family (lorr, random_matrix_adaption): W from docs/functions.md, apply, gradients, seeds, every backend."""
import io

import pytest
import torch

import tinyrecon as tr
from tinyrecon import _random
from conftest import DEVICE, DTYPES, assert_close, backends_for, check_compiles_to_one_op

LORR, RMA = tr.lorr_reconciliation, tr.random_matrix_adaption_reconciliation

# n, D, r, batch, C: odd sizes (no multiple of a block size), a single element, channels, empty batch.
CASES = [(5, 7, 3, (4,), 1), (1, 1, 1, (2, 3), 1), (13, 29, 2, (3,), 3), (6, 12, 1, (0,), 2)]
# (class, backend) for every backend that runs the class's apply op here.
CLS_BACKENDS = [pytest.param(cls, p.values[0], marks=p.marks, id=f"{short}-{p.id}")
                for cls, short, op in ((LORR, "lorr", "lorr_apply"), (RMA, "rma", "random_matrix_adaption_apply"))
                for p in backends_for(op)]


def direct_W(rec, w, n, D):
    """W of docs/functions.md built the obvious way (w: (C, l)), as (C, n, D)."""
    C, r = w.shape[0], rec.r
    if isinstance(rec, LORR):
        A, B = w[:, :n * r].reshape(C, n, r), w[:, n * r:].reshape(C, r, D)
        return A @ B
    A, B = rec.matrices(n, D, device=w.device, dtype=w.dtype)
    l1, l2 = w[:, :n], w[:, n:]
    return torch.stack([torch.diag(l1[c]) @ A @ torch.diag(l2[c]) @ B.T for c in range(C)])


def tol_dtype(dtype, backend, rec):
    # Triton draws normals with its own libm (Box-Muller): ~1e-6 from torch's, so float64 results
    # of the seeded function can only match the torch reference to float32 accuracy.
    random = isinstance(rec, RMA)
    return torch.float32 if backend == "triton" and random and dtype == torch.float64 else dtype


def test_calculate_l():
    assert LORR(r=1).calculate_l(6, 12) == 18              # docs/functions.md's example
    assert LORR(r=3).calculate_l(5, 7) == 36
    assert RMA(r=2).calculate_l(6, 12) == 8                # n + r
    assert RMA(r=5).calculate_l(64, 615440) == 69


def test_random_matrix_adaption_matrices_come_from_the_seed():
    rec = RMA(r=3, seed=11)
    A, B = rec.matrices(5, 7)
    assert torch.equal(A, _random.randn(rec.stream_seed(0), (5, 3)))
    assert torch.equal(B, _random.randn(rec.stream_seed(1), (7, 3)))
    assert not torch.equal(A[:, 0], B[:5, 0])              # two streams, not one


@pytest.mark.parametrize("cls,backend", CLS_BACKENDS)
@pytest.mark.parametrize("n,D,r,batch,C", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_build_and_apply(cls, backend, n, D, r, batch, C, dtype):
    torch.manual_seed(0)
    rec = cls(r=r, seed=3) if cls is RMA else cls(r=r)
    l = rec.calculate_l(n, D)
    w = torch.randn(C, l, dtype=torch.float64, device=DEVICE).to(dtype)
    x = torch.randn(*batch, 2 * D, dtype=torch.float64, device=DEVICE).to(dtype)[..., ::2]   # non-contiguous
    bias = torch.randn(n, dtype=torch.float64, device=DEVICE).to(dtype)
    W64 = direct_W(rec, w.double(), n, D)
    expected = torch.einsum("...d,cnd->c...n", x.double(), W64) + bias.double()
    tol = tol_dtype(dtype, backend, rec)
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
    n, D, r, C = 3, 5, 2, 2
    rec = cls(r=r, seed=5) if cls is RMA else cls(r=r)
    opts = dict(dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(C, rec.calculate_l(n, D), **opts)
    x = torch.randn(2, D, **opts)
    bias = torch.randn(n, **opts)
    fast = backend != "torch"    # one random direction per input: the interpreter is slow
    assert torch.autograd.gradcheck(lambda w: rec(w=w, n=n, D=D, backend=backend), (w,), fast_mode=fast)
    assert torch.autograd.gradcheck(lambda x, w, b: rec.apply(x, w, n=n, bias=b, backend=backend), (x, w, bias),
                                    fast_mode=fast)


@pytest.mark.parametrize("cls,backend", [p for p in CLS_BACKENDS if p.values[1] != "torch"])
def test_gradients_match_reference(cls, backend):
    """Gradients of x, w, bias (fp32) against the torch reference's autograd, over tile edges."""
    torch.manual_seed(1)
    n, D, r, N, C = 17, 37, 3, 21, 2
    rec = cls(r=r, seed=6) if cls is RMA else cls(r=r)
    x = torch.randn(N, 2 * D, device=DEVICE)[:, 1::2]
    w = torch.randn(C, rec.calculate_l(n, D), device=DEVICE)
    bias = torch.randn(n, device=DEVICE)
    dy = torch.randn(C, N, n, device=DEVICE)
    dW = torch.randn(C, n, D, device=DEVICE)
    grads = {}
    for b in ("torch", backend):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, bias))
        y = rec.apply(xs, ws, n=n, bias=bs, backend=b)
        W = rec(w=ws, n=n, D=D, backend=b)
        torch.autograd.backward((y, W), (dy, dW))
        grads[b] = (xs.grad, ws.grad, bs.grad)
    for got, want in zip(grads[backend], grads["torch"]):
        assert_close(got, want)


def test_random_matrix_adaption_seeds():
    n, D = 5, 7
    a = RMA(r=2, seed=21)
    w = torch.randn(a.calculate_l(n, D))
    W = a(w=w, n=n, D=D)
    assert torch.equal(W, RMA(r=2, seed=21)(w=w, n=n, D=D))        # same seed, same W
    assert not torch.equal(W, RMA(r=2, seed=22)(w=w, n=n, D=D))    # another seed, another W
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = RMA(r=2, seed=99)
    b.load_state_dict(torch.load(buf))
    assert torch.equal(b(w=w, n=n, D=D), W)                          # round trip to a fresh instance
    assert torch.equal(a.to(torch.float64).to("cpu")(w=w, n=n, D=D), W)   # .to() keeps the seed


def test_random_matrix_adaption_matrices_are_frozen():
    rec = RMA(r=2, seed=4)
    assert list(rec.parameters()) == []
    w = torch.randn(7, requires_grad=True)
    rec(w=w, n=5, D=6).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    A, B = rec.matrices(5, 6)
    assert not A.requires_grad and not B.requires_grad


@pytest.mark.parametrize("n, D", [(5, 6), (16, 4096)])   # a small W built whole, and the structured apply
def test_random_matrix_adaption_first_call_under_inference_mode_then_training(n, D):
    """The frozen matrices kept by a first call under torch.inference_mode() are plain tensors:
    a later training step saves them for its backward (the apply reads the cache's own tensors)."""
    _random.clear_cache()
    rec = RMA(r=2, seed=77)
    x = torch.randn(3, D)
    w = torch.randn(rec.calculate_l(n, D), requires_grad=True)
    with torch.inference_mode():
        y0 = rec.apply(x, w, n=n)
    y = rec.apply(x, w, n=n)
    y.sum().backward()
    assert torch.equal(y.detach(), y0) and w.grad.abs().sum() > 0


def test_random_matrix_adaption_matrices_are_the_callers_own():
    """``matrices()`` hands out copies: writing to them changes neither what the apply reads nor the
    next ``matrices()``."""
    _random.clear_cache()
    rec = RMA(r=2, seed=78)
    n, D = 16, 4096
    x, w = torch.randn(3, D), torch.randn(rec.calculate_l(n, D))
    y = rec.apply(x, w, n=n)
    A, B = rec.matrices(n, D)
    A.zero_(), B.zero_()
    assert torch.equal(rec.apply(x, w, n=n), y)
    assert rec.matrices(n, D)[1].abs().sum() > 0


triton_only = pytest.mark.skipif(bool(tr.dispatch.why_not("triton", "random_matrix_adaption_apply", torch.device(DEVICE).type)),
                                 reason="Triton cannot run here")


@triton_only
def test_in_kernel_matrices_equal_torch_philox():
    from tinyrecon.kernels import lowrank as K
    rec = RMA(r=3, seed=2**62 + 9)
    n, D = 5, 37
    A, B = rec.matrices(n, D, device=DEVICE)
    # Box-Muller runs on each side's libm: equal to ~1 ulp of the log/cos, not bit for bit.
    exact = dict(rtol=0, atol=2e-6)
    torch.testing.assert_close(K.randn(rec.stream_seed(0), n, 3, torch.float32, torch.device(DEVICE)), A, **exact)
    # l1 = 1, l2 = e_k: the build kernel's W is the outer product of column k of A and of B.
    l2 = torch.eye(3, device=DEVICE)
    W = tr.ops.OPS["random_matrix_adaption_build"].impls["triton"](torch.ones(3, n, device=DEVICE), l2, rec.stream_seed(0), rec.stream_seed(1), D)
    torch.testing.assert_close(W, A.T[:, :, None] * B.T[:, None, :], **exact)
    # x = I: the fused apply's y[c] is W_c^T, drawn by the apply kernel itself.
    y = tr.ops.OPS["random_matrix_adaption_apply"].impls["triton"](torch.eye(D, device=DEVICE), torch.ones(3, n, device=DEVICE), l2,
                    rec.stream_seed(0), rec.stream_seed(1), None)
    torch.testing.assert_close(y, W.transpose(1, 2), **exact)


@triton_only
@pytest.mark.parametrize("rec", [tr.lorr_reconciliation(r=2), tr.random_matrix_adaption_reconciliation(r=2, seed=1)],
                         ids=["lorr", "rma"])
def test_torch_compile_sees_one_op(rec):
    check_compiles_to_one_op(rec, 4, 6, "triton")
