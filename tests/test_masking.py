"""masking_reconciliation: the mask is exactly Philox(seed) < p, frozen or redrawn, on every backend."""
import io

import pytest
import torch

import tinyrecon as tr
from tinyrecon import _random
from conftest import DEVICE, DTYPES, assert_close, backends_for, check_apply_layouts, check_compiles_to_one_op, check_grads_match_reference

BACKENDS = backends_for("masking_apply")


def reference_mask(seed, n, D, p):
    return _random.rand(seed, (n, D)) < p


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 1.0])
def test_mask_is_philox_below_p(backend, p):
    n, D = 13, 17
    rec = tr.masking_reconciliation(p=p, seed=1234)
    w = torch.randn(3, n * D, dtype=torch.float64, device=DEVICE)
    W = rec(w=w, n=n, D=D, backend=backend).cpu()
    M = reference_mask(rec.mask_seed(), n, D, p)
    assert torch.equal(W, w.cpu().reshape(3, n, D) * M)
    assert torch.equal(rec(w=torch.ones(n * D, device=DEVICE), n=n, D=D, backend=backend).cpu(), M.float())


def test_density_near_p():
    for p in (0.1, 0.5, 0.8):
        rec = tr.masking_reconciliation(p=p, seed=7)
        density = rec(w=torch.ones(300 * 200), n=300, D=200).mean().item()
        assert abs(density - p) < 0.01   # 60000 draws: 4.5 standard deviations at p = 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_mask(backend):
    n, D = 6, 9
    w = torch.randn(n * D, dtype=torch.float64, device=DEVICE)
    fixed = tr.masking_reconciliation(fixed_mask=True)
    assert torch.equal(fixed(w=w, n=n, D=D, backend=backend), fixed(w=w, n=n, D=D, backend=backend))
    x = torch.randn(4, D, dtype=torch.float64, device=DEVICE)
    assert_close(fixed.apply(x, w, n=n, backend=backend), x @ fixed(w=w, n=n, D=D).T)
    fresh = tr.masking_reconciliation(fixed_mask=False)
    Ws = [fresh(w=w, n=n, D=D, backend=backend) for _ in range(4)]
    assert all(not torch.equal(a, b) for i, a in enumerate(Ws) for b in Ws[i + 1:])
    masks = [_random.derive_seed(fresh.stream_seed(0), k) for k in range(1, 5)]
    for W, seed in zip(Ws, masks):   # call k uses the seed derived from (seed, k)
        assert torch.equal(W.cpu(), w.cpu().reshape(n, D) * reference_mask(seed, n, D, 0.5))


@pytest.mark.parametrize("fixed_mask", [True, False])
def test_seed_round_trips_through_state_dict(fixed_mask):
    n, D = 5, 8
    w = torch.randn(n * D)
    a = tr.masking_reconciliation(p=0.4, fixed_mask=fixed_mask)
    a(w=w, n=n, D=D)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = tr.masking_reconciliation(p=0.4, fixed_mask=fixed_mask)
    assert b.seed != a.seed
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    assert b.seed == a.seed
    assert torch.equal(a(w=w, n=n, D=D), b(w=w, n=n, D=D))   # the next call's mask too


def test_explicit_seed_reproduces():
    n, D = 7, 11
    w = torch.randn(n * D)
    W = tr.masking_reconciliation(seed=99)(w=w, n=n, D=D)
    assert torch.equal(W, tr.masking_reconciliation(seed=99)(w=w, n=n, D=D))
    assert not torch.equal(W, tr.masking_reconciliation(seed=100)(w=w, n=n, D=D))


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_p_must_be_a_probability(p):
    with pytest.raises(ValueError, match="p must be a probability in"):
        tr.masking_reconciliation(p=p)


def test_wrong_l_shows_formula():
    with pytest.raises(ValueError, match=r"l = n\*D = 6\*12 = 72; got \(71,\)"):
        tr.masking_reconciliation()(w=torch.randn(71), n=6, D=12)


def _expected(rec, x, w, n, b):
    W = rec(w=w.double(), n=n, D=x.shape[-1], backend="torch")
    y = torch.einsum("...d,cnd->c...n", x.double(), W.reshape(-1, *W.shape[-2:])) + b.double()
    return y if W.dim() == 3 else y[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,D", [(13, 17), (40, 35)])
def test_apply_matches_dense(backend, dtype, n, D):
    rec = tr.masking_reconciliation(p=0.6, seed=5)
    w = torch.randn(n * D, dtype=torch.float64, device=DEVICE).to(dtype)
    x = torch.randn(37, D, dtype=torch.float64, device=DEVICE).to(dtype)
    b = torch.randn(n, dtype=torch.float64, device=DEVICE).to(dtype)
    y = rec.apply(x, w, n=n, bias=b, backend=backend)
    assert y.shape == (37, n) and y.dtype == dtype
    assert_close(y, _expected(rec, x, w, n, b), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_layouts_of_x_and_channels(backend):
    check_apply_layouts(tr.masking_reconciliation(p=0.5, seed=3), 11, 9, backend, _expected)



@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    n, D = 5, 7
    rec = tr.masking_reconciliation(p=0.5, seed=11)
    opts = dict(dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(2, n * D, **opts)
    x = torch.randn(3, D, **opts)
    b = torch.randn(n, **opts)
    fast = backend != "torch"   # a random directional derivative: few calls of the (slow) interpreter
    assert torch.autograd.gradcheck(lambda w: rec(w=w, n=n, D=D, backend=backend), (w,), fast_mode=fast)
    assert torch.autograd.gradcheck(lambda x, w, b: rec.apply(x, w, n=n, bias=b, backend=backend), (x, w, b),
                                    fast_mode=fast)
    # Masked-out entries of w get exactly zero gradient.
    w1 = torch.randn(n * D, **opts)
    rec.apply(x.detach(), w1, n=n, backend=backend).sum().backward()
    M = reference_mask(rec.mask_seed(), n, D, 0.5).flatten().to(DEVICE)
    assert torch.all(w1.grad[~M] == 0) and torch.all(w1.grad[M] != 0)


# ---- the Triton (and CUDA) kernels against the torch reference ------------------------------------
FUSED = [b for b in BACKENDS if b.id != "torch"]


@pytest.mark.parametrize("backend", FUSED)
def test_every_kernel_uses_the_reference_mask_bit_for_bit(backend):
    """Apply, grad x, grad w and build each regenerate M; with one-hot inputs each result is M*w exactly."""
    n, D = 17, 33
    rec = tr.masking_reconciliation(p=0.3, seed=2**40 + 3)
    M = reference_mask(rec.mask_seed(), n, D, 0.3).to(DEVICE)
    w = torch.randn(n * D, device=DEVICE, requires_grad=True)
    Mw = M * w.detach().reshape(n, D)
    x = torch.eye(D, device=DEVICE, requires_grad=True)
    y = rec.apply(x, w, n=n, backend=backend)
    assert torch.equal(y, Mw.T)                               # the apply kernel's mask
    gx, = torch.autograd.grad(y, x, torch.eye(D, n, device=DEVICE), retain_graph=True)
    assert torch.equal(gx[:n], Mw) and not gx[n:].any()       # grad x: row i of dy picks row i of M*w
    gw, = torch.autograd.grad(y, w, torch.ones(D, n, device=DEVICE))
    assert torch.equal(gw.reshape(n, D), M.float())           # grad w: M * (ones^T @ I)
    assert torch.equal(rec(w=w, n=n, D=D, backend=backend), Mw)
    gw, = torch.autograd.grad(rec(w=w, n=n, D=D, backend=backend), w, torch.ones(n, D, device=DEVICE))
    assert torch.equal(gw.reshape(n, D), M.float())           # the build's backward


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grads_match_reference(backend, dtype):
    """Backward kernels (x, w, bias; build's w) vs the reference's autograd in float64."""
    check_grads_match_reference(tr.masking_reconciliation(p=0.7, seed=8), 17, 19, 17, backend, dtype)



@pytest.mark.parametrize("backend", FUSED)
def test_torch_compile_sees_one_op(backend):
    check_compiles_to_one_op(tr.masking_reconciliation(p=0.5, seed=4), 6, 10, backend)
