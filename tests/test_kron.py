"""Kronecker family (hm, lphm, dual_lphm): W from docs/functions.md, apply per backend/dtype/layout, gradients, errors."""
import pytest
import torch

import tinyrecon as tr
from tinyrecon import dispatch
from tinyrecon.functions import kron
from conftest import DEVICE, DTYPES, assert_close, backends_for, check_compiles_to_one_op, isa_levels

KINDS = {"hm": tr.hm_reconciliation, "lphm": tr.lphm_reconciliation, "dual_lphm": tr.dual_lphm_reconciliation}
LAYOUTS = ("kron", "tinybig")
# (n, D, p, q, r): s = n/p and t = D/q odd and even, p < q and p > q, s = t = 1 (r > s),
# and s, t above 16 so kernel tiles have edges.
SHAPES = [(15, 14, 3, 2, 2), (20, 6, 4, 2, 3), (6, 20, 2, 4, 1), (5, 7, 5, 7, 2), (34, 36, 2, 2, 3)]


def make(kind, p, q, r=2, layout="kron"):
    cls = KINDS[kind]
    return cls(p=p, q=q, layout=layout) if kind == "hm" else cls(p=p, q=q, r=r, layout=layout)


def factors(kind, w, n, D, p, q, r):
    """(A, B) of docs/functions.md from one channel's w (1-D): consecutive slices, in the table's order."""
    s, t = n // p, D // q
    shapes = {"hm": [(p, q), (s, t)],
              "lphm": [(p, q), (s, r), (r, t)],
              "dual_lphm": [(p, r), (r, q), (s, r), (r, t)]}[kind]
    assert w.numel() == sum(a * b for a, b in shapes)
    parts, start = [], 0
    for a, b in shapes:
        parts.append(w[start:start + a * b].reshape(a, b))
        start += a * b
    if kind == "hm":
        return parts[0], parts[1]
    if kind == "lphm":
        return parts[0], parts[1] @ parts[2]
    return parts[0] @ parts[1], parts[2] @ parts[3]


def direct_W(layout, A, B):
    """W = A kron B, or tinyBIG 0.2.1's W[i, j] = a[(i*D + j) // (s*t)] * b[(i*D + j) % (s*t)]."""
    if layout == "kron":
        return torch.kron(A, B)
    (p, q), (s, t) = A.shape, B.shape
    n, D = p * s, q * t
    f = torch.arange(n)[:, None] * D + torch.arange(D)[None, :]
    return A.flatten()[f // (s * t)] * B.flatten()[f % (s * t)]


def expected_W(kind, layout, w, n, D, p, q, r):
    """(C, n, D) in float64 for w of shape (C, l)."""
    return torch.stack([direct_W(layout, *factors(kind, wc.double().cpu(), n, D, p, q, r)) for wc in w])


def each(with_torch=True):
    """(kind, layout, backend) triples; a backend that cannot run kron_apply here is a skip with its reason."""
    return [pytest.param(k, lay, *b.values, marks=b.marks, id=f"{k}-{lay}-{b.id}")
            for k in KINDS for lay in LAYOUTS for b in backends_for("kron_apply")
            if with_torch or b.id != "torch"]


# ---- W ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,layout,backend", each())
def test_build_matches_definition(kind, layout, backend):
    for n, D, p, q, r in SHAPES:
        rec = make(kind, p, q, r, layout)
        w = torch.randn(3, rec.calculate_l(n, D), dtype=torch.float64, device=DEVICE)
        W = rec(w=w, n=n, D=D, backend=backend)
        assert W.shape == (3, n, D) and W.dtype == torch.float64
        assert_close(W.cpu(), expected_W(kind, layout, w, n, D, p, q, r))
        assert_close(rec(w=w[1], n=n, D=D, backend=backend).cpu(), W[1].cpu())   # one channel: no C dim


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,D,p,q", [(6, 12, 2, 2), (6, 12, 6, 3), (6, 12, 3, 1), (6, 4, 3, 4), (6, 12, 6, 1)])
def test_layouts_agree_iff_s_or_q_is_one(kind, n, D, p, q):
    w = torch.randn(make(kind, p, q).calculate_l(n, D), dtype=torch.float64)
    Wk = make(kind, p, q)(w=w, n=n, D=D)
    Wt = make(kind, p, q, layout="tinybig")(w=w, n=n, D=D)
    assert torch.equal(Wk, Wt) == (n == p or q == 1)


def test_calculate_l():
    n, D = 6, 12   # docs/functions.md's examples: p=None, q=None give p=2, q=3
    assert tr.hm_reconciliation().calculate_l(n, D) == 18
    assert tr.lphm_reconciliation(r=1).calculate_l(n, D) == 13
    assert tr.dual_lphm_reconciliation(r=1).calculate_l(n, D) == 12
    assert tr.hm_reconciliation(p=2, q=2).calculate_l(n, D) == 22
    assert tr.lphm_reconciliation(p=3, q=4, r=3).calculate_l(n, D) == 12 + 3 * (2 + 3)
    assert tr.dual_lphm_reconciliation(p=1, q=12, r=2).calculate_l(n, D) == 2 * (1 + 12 + 6 + 1)


@pytest.mark.parametrize("k,f", [(6, 2), (12, 3), (64, 8), (784, 28), (615440, 784), (13, 1), (1, 1)])
@pytest.mark.parametrize("kind", KINDS)
def test_p_none_picks_largest_divisor_up_to_isqrt(kind, k, f):
    rec = make(kind, None, None)
    assert rec.pq(k, k) == (f, f)
    assert rec.pq(k, 6) == (f, 2)


# ---- apply ----------------------------------------------------------------------------------------
def expected_y(kind, layout, x, w, n, p, q, r, bias):
    """x @ W^T + bias in float64 from the same (rounded) inputs: (C, *batch, n)."""
    W = expected_W(kind, layout, w, n, x.shape[-1], p, q, r)
    y = torch.einsum("...d,cnd->c...n", x.double().cpu(), W)
    return y if bias is None else y + bias.double().cpu()


@pytest.mark.parametrize("kind,layout,backend", each())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply_matches_dense(kind, layout, backend, dtype):
    torch.manual_seed(0)
    for n, D, p, q, r in SHAPES[:3] if dtype in (torch.float16, torch.bfloat16) else SHAPES:
        rec = make(kind, p, q, r, layout)
        w = torch.randn(rec.calculate_l(n, D), dtype=torch.float64, device=DEVICE).to(dtype)
        x = torch.randn(37, D, dtype=torch.float64, device=DEVICE).to(dtype)
        b = torch.randn(n, dtype=torch.float64, device=DEVICE).to(dtype)
        y = rec.apply(x, w, n=n, bias=b, backend=backend)
        assert y.shape == (37, n) and y.dtype == dtype
        assert_close(y.cpu(), expected_y(kind, layout, x, w[None], n, p, q, r, b)[0], dtype)


@pytest.mark.parametrize("kind,layout,backend", each())
def test_apply_layouts_of_x_and_channels(kind, layout, backend):
    n, D, p, q, r = 15, 14, 3, 2, 2
    rec = make(kind, p, q, r, layout)
    w = torch.randn(3, rec.calculate_l(n, D), dtype=torch.float64, device=DEVICE)
    b = torch.randn(2 * n, dtype=torch.float64, device=DEVICE)[::2]   # strided too
    xs = {
        "strided": torch.randn(5, 2 * D, dtype=torch.float64, device=DEVICE)[:, ::2],
        "transposed": torch.randn(D, 5, dtype=torch.float64, device=DEVICE).T,
        "batch dims": torch.randn(2, 3, D, dtype=torch.float64, device=DEVICE),
        "one row": torch.randn(D, dtype=torch.float64, device=DEVICE),
        "empty": torch.randn(0, D, dtype=torch.float64, device=DEVICE),
        "empty batch dims": torch.randn(2, 0, D, dtype=torch.float64, device=DEVICE),
    }
    for what, x in xs.items():
        y = rec.apply(x, w, n=n, bias=b, backend=backend)
        assert y.shape == (3, *x.shape[:-1], n), what
        assert_close(y.cpu(), expected_y(kind, layout, x, w, n, p, q, r, b))
        y1 = rec.apply(x, w[1], n=n, backend=backend)   # one channel: no channel dim
        assert y1.shape == (*x.shape[:-1], n), what
        assert_close(y1, y[1] - b)


# ---- gradients ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,layout,backend", each())
def test_gradcheck(kind, layout, backend):
    torch.manual_seed(0)
    n, D, p, q, r = 4, 6, 2, 3, 1   # s = 2, q = 3: the layouts differ
    rec = make(kind, p, q, r, layout)
    opts = dict(dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(2, rec.calculate_l(n, D), **opts)
    x = torch.randn(3, D, **opts)
    b = torch.randn(n, **opts)
    # fast mode (random projections of the Jacobian): interpreted kernels are too slow for the full one
    assert torch.autograd.gradcheck(lambda w: rec(w=w, n=n, D=D, backend=backend), (w,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x, w, b: rec.apply(x, w, n=n, bias=b, backend=backend), (x, w, b),
                                    fast_mode=True)


@pytest.mark.parametrize("kind,layout,backend", each(with_torch=False))
def test_grads_match_reference(kind, layout, backend):
    """Gradients of a fused backend vs the torch reference's autograd, on shapes with tile edges."""
    torch.manual_seed(0)
    n, D, p, q, r = 34, 36, 2, 2, 3
    rec = make(kind, p, q, r, layout)
    w = torch.randn(2, rec.calculate_l(n, D), device=DEVICE)
    x = torch.randn(2, 19, D, device=DEVICE)[:, ::2]
    b = torch.randn(n, device=DEVICE)
    g = torch.randn(2, 2, 10, n, device=DEVICE)
    for wants in ((True, True, True), (False, True, False)):   # all, and w alone (no dx, no dbias)
        grads = []
        for bk in (backend, "torch"):
            ins = [t.detach().requires_grad_(need) for t, need in zip((x, w, b), wants)]
            y = rec.apply(ins[0], ins[1], n=n, bias=ins[2], backend=bk)
            grads.append(torch.autograd.grad(y, [t for t in ins if t.requires_grad], g))
        for got, ref in zip(*grads):
            assert_close(got, ref)
    w2 = w.detach().requires_grad_()
    gW = torch.randn(2, n, D, device=DEVICE)
    got, = torch.autograd.grad(rec(w=w2, n=n, D=D, backend=backend), w2, gW)
    ref, = torch.autograd.grad(rec(w=w2, n=n, D=D, backend="torch"), w2, gW)
    assert_close(got, ref)


@pytest.mark.parametrize("kind,layout,backend", each())
def test_grads_of_empty_batch(kind, layout, backend):
    n, D, p, q, r = 6, 10, 3, 2, 2
    rec = make(kind, p, q, r, layout)
    w = torch.randn(rec.calculate_l(n, D), device=DEVICE, requires_grad=True)
    b = torch.randn(n, device=DEVICE, requires_grad=True)
    rec.apply(torch.randn(0, D, device=DEVICE), w, n=n, bias=b, backend=backend).sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


# ---- tinyBIG layout's structured apply ------------------------------------------------------------
# (n, D, p, q): s | q, q | s, gcd(s, q) = 2 but neither divides, s and q coprime, and shapes
# where the cost rule in tinybig_outer_apply picks the dense product instead.
OUTER = [((6, 20, 3, 4), True),     # s = 2 | q = 4: k = 1
         ((12, 10, 2, 2), True),    # q = 2 | s = 6: m = 1, k = 3
         ((12, 12, 2, 4), True),    # s = 6, q = 4: g = 2t, m = 2, k = 3
         ((12, 12, 4, 2), True),    # s = 3, q = 2 coprime: m = 2, k = 3
         ((15, 3, 3, 3), False),    # s = 5, q = 3, t = 1: m*k = 15 > D
         ((6, 12, 2, 2), False)]    # s = 3, q = 2, t = 6: m*k = 6 <= D but dearer than dense


@pytest.mark.parametrize("shape,structured", OUTER, ids=str)
def test_tinybig_outer_apply(shape, structured, monkeypatch):
    n, D, p, q = shape
    s, t = n // p, D // q
    calls = []
    one_hot = torch.nn.functional.one_hot
    monkeypatch.setattr(torch.nn.functional, "one_hot", lambda *a: calls.append(a) or one_hot(*a))
    A, B = torch.randn(2, p, q, dtype=torch.float64), torch.randn(2, s, t, dtype=torch.float64)
    x, b = torch.randn(7, D, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    y = kron.tinybig_outer_apply(x, A.reshape(2, -1), B.reshape(2, -1), n, b)
    assert bool(calls) == structured   # the selector G is built only on the structured path
    W = torch.stack([direct_W("tinybig", A[c], B[c]) for c in range(2)])
    assert_close(y, x @ W.transpose(1, 2) + b)


# ---- errors ---------------------------------------------------------------------------------------
FORMULAS = {"hm": r"l = p\*q \+ s\*t = 2\*3 \+ 3\*4 = 18",
            "lphm": r"l = p\*q \+ r\*\(s\+t\) = 2\*3 \+ 2\*\(3\+4\) = 20",
            "dual_lphm": r"l = r\*\(p\+q\+s\+t\) = 2\*\(2\+3\+3\+4\) = 24"}


@pytest.mark.parametrize("kind", KINDS)
def test_errors(kind):
    with pytest.raises(ValueError, match=r"p=4 must be a positive divisor of n=6; divisors of 6: \[1, 2, 3, 6\]"):
        make(kind, 4, 3)(w=torch.randn(18), n=6, D=12)
    with pytest.raises(ValueError, match=r"q=5 must be a positive divisor of D=12; divisors of 12: "
                                         r"\[1, 2, 3, 4, 6, 12\]"):
        make(kind, 2, 5).apply(torch.randn(2, 12), torch.randn(18), n=6)
    l = make(kind, 2, 3).calculate_l(6, 12)
    with pytest.raises(ValueError, match=FORMULAS[kind] + r"; got \(17,\)"):
        make(kind, 2, 3)(w=torch.randn(17), n=6, D=12)
    with pytest.raises(ValueError, match=FORMULAS[kind] + rf"; got \(2, {l + 1}\)"):
        make(kind, None, None).apply(torch.randn(2, 12), torch.randn(2, l + 1), n=6)


# ---- torch.compile --------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [b for b in backends_for("kron_apply") if b.id != "torch"])
def test_torch_compile_sees_one_op(backend):
    check_compiles_to_one_op(tr.dual_lphm_reconciliation(p=2, q=3, r=1), 6, 12, backend)


def _passes():
    """Each implementation of the Kronecker core's pass over x; the CPU library's skips where it is not built."""
    from tinyrecon import cpu_lib
    reason = cpu_lib.load_error()
    return [pytest.param("torch", id="torch"),
            pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(bool(reason), reason=reason))]


def _x_ops(name):
    """The torch reference's ops on x, or the CPU library's kernels (ungated: every size and rank)."""
    if name == "torch":
        return kron.TORCH_X_OPS
    from tinyrecon import cpu_ops
    return cpu_ops.KERNEL_X_OPS


@pytest.mark.parametrize("passes", _passes())
@pytest.mark.parametrize("rA,rB", [(2, 4), (4, 2)])
@pytest.mark.parametrize("wants", [(True, True, True), (False, True, False), (False, False, True), (True, False, False)],
                         ids=["all", "Ar", "Br", "x"])
def test_kron_core_grads(wants, rA, rB, passes):
    """The one-pass core keeps U (for dBr) and V (for dAr) exactly as kron_apply asks; each case is exact."""
    from tinyrecon.functions.kron import _KronCore
    x, Ar, Br = (torch.randn(*s, dtype=torch.float64) for s in ((3, 5, 7), (rA, 5), (rB, 7)))
    for t, want in zip((x, Ar, Br), wants):
        t.requires_grad_(want)
    inputs = [t for t in (x, Ar, Br) if t.requires_grad]
    core = _KronCore.apply(x, Ar, Br, Br.requires_grad, Ar.requires_grad, _x_ops(passes))[0]   # (core, U, V)
    expected = Ar @ x @ Br.T
    assert_close(core, expected)
    g = torch.randn_like(core)
    for a, e in zip(torch.autograd.grad(core, inputs, g), torch.autograd.grad(expected, inputs, g)):
        assert_close(a, e)


@pytest.mark.parametrize("passes", _passes())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("N,M,K,RA,RB", [(3, 5, 7, 2, 3), (2, 17, 4099, 5, 1), (1, 9, 70001, 4, 6), (4, 1, 1, 9, 8),
                                         (5, 0, 3, 2, 2), (0, 4, 3, 1, 1), (1, 33, 70001, 5, 6), (5, 33, 7001, 3, 2),
                                         (3, 7, 2053, 13, 2), (1, 128, 9001, 32, 1)])
def test_kron_passes_match_their_definition(N, M, K, RA, RB, dtype, passes):
    """U = L @ X[b] and V = R @ X^T for ranks above and below the kernel's register groups (6),
    K past its blocks and not a multiple of the vector width, M not a multiple of its row tile,
    empty sizes, one batch big enough to be split over threads by columns, batches shared out
    over threads in chunks, and a non-contiguous x; each of U and V alone too (U alone for more than
    two groups of rows and few rows of x takes register blocks of U over all of x's rows)."""
    x = torch.randn(N, M, 2 * K, dtype=dtype)[..., ::2]
    L, R = torch.randn(RA, M, dtype=dtype), torch.randn(RB, K, dtype=dtype)
    U_ref = (L.double() @ x.double()).to(dtype)
    V_ref = (R.double() @ x.double().reshape(N * M, K).T).to(dtype)
    for want_u, want_v in ((True, True), (True, False), (False, True)):
        U, V = _x_ops(passes).passes(x, L, R, want_u, want_v)
        assert (U is None) != want_u and (V is None) != want_v
        if want_u:
            assert U.shape == (N, RA, K) and U.dtype == dtype
            assert_close(U, U_ref)
        if want_v:
            assert V.shape == (RB, N * M) and V.dtype == dtype
            assert_close(V, V_ref)


@pytest.mark.parametrize("passes", _passes())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("N,M,K,RB", [(2, 5, 7, 3), (1, 9, 70001, 5), (3, 4, 2051, 7), (2, 3, 5, 1)])
@pytest.mark.parametrize("layout", ["transposed", "row-strided", "other"])
def test_kron_passes_read_R_through_its_strides(N, M, K, RB, layout, dtype, passes):
    """V from an R given as a transpose (random_matrix_adaption's B^T: packed by the kernel), as
    rows of a wider matrix, or with neither stride 1 (copied), over K blocks and thread splits."""
    x = torch.randn(N, M, K, dtype=dtype)
    R = {"transposed": torch.randn(K, RB, dtype=dtype).T, "row-strided": torch.randn(RB, K + 3, dtype=dtype)[:, 1:-2],
         "other": torch.randn(2 * RB, 2 * K, dtype=dtype)[::2, ::2]}[layout]
    U, V = _x_ops(passes).passes(x, torch.randn(2, M, dtype=dtype), R, False, True)
    assert_close(V, (R.double() @ x.double().reshape(N * M, K).T).to(dtype))


@pytest.mark.parametrize("passes", _passes())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("N,M,K,RA", [(3, 5, 7, 2), (2, 17, 4099, 5), (1, 9, 70001, 7), (4, 1, 1, 9), (5, 0, 3, 2),
                                      (0, 4, 3, 1), (2, 3, 4, 0), (1, 33, 70001, 3)])
def test_kron_expand_matches_its_definition(N, M, K, RA, dtype, passes):
    """dX[b] = L^T @ G[b]: ranks around the tile, long K, short last tiles, empty sizes, a strided G,
    one batch split over threads by columns."""
    G = torch.randn(N, RA, 2 * K, dtype=dtype)[..., ::2]
    L = torch.randn(RA, M, dtype=dtype)
    dx = _x_ops(passes).expand(G, L)
    assert dx.shape == (N, M, K) and dx.dtype == dtype
    assert_close(dx, (L.double().T @ G.double()).to(dtype))


@pytest.mark.parametrize("passes", _passes()[1:])
def test_cpu_kernels_run_eagerly_and_trace_as_ops(passes, monkeypatch):
    """Eager calls reach the kernels as plain functions (a custom op's first call imports
    torch._dynamo, seconds); tracers get the custom ops, which have fake kernels."""
    import subprocess
    import sys
    code = ("import sys, torch, tinyrecon as tr\n"
            "rec = tr.dual_lphm_reconciliation(p=2, q=4, r=2)\n"
            "x, w = torch.randn(64, 1 << 15), torch.randn(rec.calculate_l(6, 1 << 15), requires_grad=True)\n"
            "rec.apply(x, w, n=6, backend='cpu').sum().backward()\n"
            "print('torch._dynamo' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
    from torch._subclasses.fake_tensor import FakeTensorMode
    from tinyrecon import cpu_ops
    ops = []
    monkeypatch.setattr(cpu_ops, "_pass", lambda *a: ops.append("plain"))
    with FakeTensorMode():
        x, L, R = torch.randn(2, 3, 4), torch.randn(2, 3), torch.randn(1, 4)
        U, V = cpu_ops.KERNEL_X_OPS.passes(x, L, R, True, True)
    assert not ops and U.shape == (2, 2, 4) and V.shape == (1, 6)


@pytest.mark.parametrize("passes", _passes())
def test_kron_passes_over_x(passes, monkeypatch):
    """Inference reads x once; training reads it in the forward only (twice with torch GEMMs, once
    with the CPU library's one-read kernel) and never in the backward."""
    rec = tr.dual_lphm_reconciliation(p=2, q=3, r=1)
    w, x = torch.randn(rec.calculate_l(6, 12), requires_grad=True), torch.randn(4, 12)
    reads = []
    if passes == "torch":
        for name in ("bmm", "mm", "matmul"):
            real = getattr(torch, name)

            def spy(*args, _real=real, **kw):
                reads.extend(a for a in args if isinstance(a, torch.Tensor) and a.numel() == x.numel())
                return _real(*args, **kw)
            monkeypatch.setattr(torch, name, spy)
    else:
        from tinyrecon import cpu_lib
        real_call = cpu_lib.call
        monkeypatch.setattr(cpu_lib, "call", lambda name, *a: reads.append(name) or real_call(name, *a))
    with torch.no_grad():
        rec.apply(x, w, n=6, backend=passes)
    assert len(reads) == 1
    y = rec.apply(x, w, n=6, backend=passes)
    in_forward = len(reads)
    assert in_forward == (3 if passes == "torch" else 2)
    y.sum().backward()
    assert len(reads) == in_forward


@pytest.mark.parametrize("march", isa_levels())
def test_cpu_library_is_right_at_each_isa_level(march, tmp_path, monkeypatch):
    """The installed library runs the best clone this CPU has; each other clone (SSE2, AVX2) is
    built here alone, warning-free, and checked on the Kronecker apply and its gradients."""
    import glob
    import subprocess

    import build_libs

    from tinyrecon import _clib, cpu_lib
    out = str(tmp_path / f"lib-{march}.so")
    root = __file__.rsplit("/tests/", 1)[0]
    sources = sorted(glob.glob(f"{root}/csrc/*.cpp"))   # the whole library: it loads only with every entry point
    command = build_libs.cxx_command("g++", sources, out, werror=True) + ["-DTR_NO_CLONES", f"-march={march}"]
    assert subprocess.run(command, cwd=root).returncode == 0
    monkeypatch.setattr(cpu_lib, "_load", lambda: (_clib.open_library(out), ""))
    for dtype in (torch.float32, torch.float64):
        for x_shape, RA, RB in (((3, 5, 7), 2, 3), ((2, 17, 1031), 5, 7)):
            x = torch.randn(*x_shape, dtype=dtype)
            L, R = torch.randn(RA, x_shape[1], dtype=dtype), torch.randn(RB, x_shape[2], dtype=dtype)
            U, V = _x_ops("cpu").passes(x, L, R, True, True)
            assert_close(U, L @ x)
            assert_close(V, R @ x.reshape(-1, x_shape[2]).T)
            G = torch.randn(x_shape[0], RA, x_shape[2], dtype=dtype)
            assert_close(_x_ops("cpu").expand(G, L), L.T @ G)


@pytest.mark.skipif(bool(dispatch.why_not("cpu", "kron_apply", "cpu")), reason="no CPU library here")
def test_cpu_kernels_take_big_x_with_thin_factors(monkeypatch):
    """The kernels run where they pay: a big x and thin factors whose rows fit L2 or are few next to
    x's rows; else torch's GEMMs."""
    from tinyrecon import cpu_lib, cpu_ops
    monkeypatch.setattr(cpu_ops, "_MIN_ELEMENTS", 1 << 20)
    calls = []
    real_call = cpu_lib.call
    monkeypatch.setattr(cpu_lib, "call", lambda name, *a: calls.append(name) or real_call(name, *a))
    both = ["tinyrecon_cpu_kron_pass", "tinyrecon_cpu_kron_expand"]
    cases = [(tr.dual_lphm_reconciliation(p=2, q=64, r=2), 2, 1 << 16, 32, both),   # x 2M elements, thin
             (tr.dual_lphm_reconciliation(p=2, q=64, r=2), 2, 1 << 16, 8, []),      # x 512K elements
             # B (32 x 32768) too wide for the pass; dx only needs A's 2 rows, which fit
             (tr.hm_reconciliation(p=2, q=2), 64, 1 << 16, 32, ["tinyrecon_cpu_kron_expand"]),
             # lorr folds x into one matrix: its forward, dx and dB are the kernels too
             (tr.lorr_reconciliation(r=3), 8, 1 << 16, 32, [both[0], both[1], both[0]]),
             # rank 32 against 32 rows of x per batch: the kernels; rank 33 (against 64): torch's GEMMs
             (tr.lorr_reconciliation(r=32), 8, 1 << 16, 32, [both[0], both[1], both[0]]),
             (tr.lorr_reconciliation(r=33), 8, 1 << 16, 64, [])]
    for rec, n, D, N, expected in cases:
        calls.clear()
        w = torch.randn(rec.calculate_l(n, D), requires_grad=True)
        x = torch.randn(N, D, requires_grad=True)
        y = rec.apply(x, w, n=n, backend="cpu")
        y.sum().backward()
        assert calls == expected, (n, D, N)
        assert_close(y, rec.apply(x, w, n=n, backend="torch"))


@pytest.mark.skipif(bool(dispatch.why_not("cpu", "kron_apply", "cpu")), reason="no CPU library here")
@pytest.mark.parametrize("want_u", [True, False], ids=["U", "no U"])
@pytest.mark.parametrize("r_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N,M,K,RA,RB", [(3, 5, 7, 2, 3), (1, 33, 70001, 5, 6), (5, 33, 7001, 3, 2), (2, 17, 4099, 7, 0),
                                         (2, 9, 5003, 1, 13), (1, 6, 8191, 1, 4), (1, 40, 9001, 14, 0)])
def test_kron_passes_read_bfloat16_x_as_is(N, M, K, RA, RB, r_dtype, want_u):
    """A bfloat16 x with a float32 L and a float32 or (read as is) bfloat16 R: U and V in float32,
    as from the exact float32 values (K blocks, tails, thread splits by batch and by column, a
    non-contiguous x, factor rows over several register groups). V alone from a bfloat16 R is the
    kernel's AVX-512 BF16 dot products where the CPU has them."""
    if not (want_u or RB):
        pytest.skip("nothing asked")
    x = torch.randn(N, M, 2 * K).bfloat16()[..., ::2]
    L, R = torch.randn(RA, M), torch.randn(max(RB, 1), K).to(r_dtype)
    U, V = _x_ops("cpu").passes(x, L, R, want_u, RB > 0)
    if want_u:
        assert U.dtype == torch.float32
        assert_close(U, L.double() @ x.double())
    if RB:
        assert V.dtype == torch.float32
        assert_close(V, R.double() @ x.double().reshape(N * M, K).T)


@pytest.mark.skipif(bool(dispatch.why_not("cpu", "kron_apply", "cpu")), reason="no CPU library here")
@pytest.mark.parametrize("rec,reads_bf16", [
    (tr.dual_lphm_reconciliation(p=2, q=64, r=2), True),
    (tr.hm_reconciliation(p=2, q=64, layout="tinybig"), False),   # the reference's own path: no kernel
    (tr.lorr_reconciliation(r=3), True),
    (tr.random_matrix_adaption_reconciliation(r=3, seed=4), True),
    (tr.duplicated_diagonal_padding_reconciliation(p=2), True)], ids=lambda v: type(v).__name__)
def test_cpu_applies_read_bfloat16_x_as_is(rec, reads_bf16, monkeypatch):
    """At kernel sizes a bfloat16 x reaches the kernel as bfloat16 (no float32 copy of x); results
    and the gradients of w and bias match the torch backend at bfloat16 tolerance."""
    from tinyrecon import cpu_lib
    codes = []
    real_call = cpu_lib.call
    monkeypatch.setattr(cpu_lib, "call", lambda name, *a: codes.append(a[0]) or real_call(name, *a))
    n, D = 8, 1 << 16
    x = torch.randn(32, D).bfloat16()
    w = torch.randn(rec.calculate_l(n, D)).bfloat16().requires_grad_()
    b = torch.randn(n).bfloat16().requires_grad_()
    y = rec.apply(x, w, n=n, bias=b, backend="cpu")
    assert y.dtype == torch.bfloat16 and (2 in codes) == reads_bf16
    y_ref = rec.apply(x, w, n=n, bias=b, backend="torch")
    assert_close(y, y_ref)
    g = torch.randn_like(y)
    for a, e in zip(torch.autograd.grad(y, (w, b), g), torch.autograd.grad(y_ref, (w, b), g)):
        assert_close(a, e)
    # no gradients: duplicated_diagonal_padding's B (as big as x's blocks) is read as is too, the
    # others' small factors are copied to float32; equal to bfloat16 rounding (AVX-512 BF16's dot
    # products add the exact products in another order than the float32 path's FMAs: about one
    # input in 20 rounds one output the other way)
    codes.clear()
    assert_close(rec.apply(x, w.detach(), n=n, bias=b.detach(), backend="cpu"), y)
    assert (3 in codes) == isinstance(rec, tr.duplicated_diagonal_padding_reconciliation)
