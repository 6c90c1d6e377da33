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
# whose train steps the CPU library makes in one call each way (cpu_ops.small_linear)
FUSED = {"hm", "lphm", "dual_lphm", "lorr", "random_matrix_adaption", "duplicated_padding", "duplicated_diagonal_padding"}


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


# ---- later calls: the checks done once per key, and W kept for the same w values (no gradient) ----
def _reference(rec, x, w, b, n=4):
    return x.double() @ rec(n, x.shape[-1], w=w.detach().double(), backend="torch").T + b.double()


def _counting(monkeypatch, rec, name):
    """Count calls of ``rec``'s method ``name`` from now on."""
    calls = []
    monkeypatch.setattr(type(rec), name, lambda self, *a, f=getattr(type(rec), name), **k: calls.append(1) or f(self, *a, **k))
    return calls


@pytest.mark.parametrize("family", sorted(BUILDS_SMALL))
def test_later_calls_skip_the_checks_and_keep_values_and_gradients(family, monkeypatch):
    rec = tr.reconciliation(family, **SMALL[family])
    x, b = torch.randn(5, 6, dtype=torch.float64), torch.randn(4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(rec.calculate_l(4, 6), dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 4, dtype=torch.float64)
    w64 = w.detach().requires_grad_()
    ref = x @ rec(4, 6, w=w64, backend="torch").T + b.detach()
    ref_grads = torch.autograd.grad(ref, w64, g)[0], g.sum(0)
    rec.apply(x, w, n=4, bias=b)
    fused = any(base._small_state(rec)[0].values())   # the CPU library builds W and its gradient itself
    assert fused == (family in FUSED and not dispatch.why_not("cpu", None, "cpu"))
    checks, builds = _counting(monkeypatch, rec, "_channels"), _counting(monkeypatch, rec, "_build")
    for _ in range(2):
        y = rec.apply(x, w, n=4, bias=b)                       # gradients wanted: W built each call
        assert_close(y, ref)
        for a, e in zip(torch.autograd.grad(y, (w, b), g), ref_grads):
            assert_close(a, e)
        with torch.no_grad():
            assert_close(rec.apply(x, w, n=4, bias=b), ref)
    assert not checks and len(builds) == (1 if fused else 3)   # no check again; W built for both grad calls, once no_grad


@pytest.mark.parametrize("family", sorted(BUILDS_SMALL))
def test_kept_w_follows_every_change_of_w(family):
    rec = tr.reconciliation(family, **SMALL[family])
    x, b = torch.randn(5, 6), torch.randn(4)
    w = torch.randn(rec.calculate_l(4, 6), requires_grad=True)
    with torch.no_grad():
        for change in (lambda: None, lambda: w.mul_(1.5), lambda: w.data.__setitem__(0, 7.0),
                       lambda: w.data.copy_(torch.randn_like(w)), lambda: setattr(w, "data", torch.randn_like(w))):
            rec.apply(x, w, n=4, bias=b)                       # W kept for w's values before the change
            change()
            assert_close(rec.apply(x, w, n=4, bias=b), _reference(rec, x, w, b))
            assert_close(rec.apply(x, w.clone(), n=4, bias=b), _reference(rec, x, w, b))   # a new tensor
            assert_close(rec.apply(x, w.detach() * 2, n=4, bias=b), _reference(rec, x, w * 2, b))


def test_kept_w_stays_out_of_torch_func():
    """Under a torch.func transform w carries what the transform tracks (here a tangent): a kept W
    would drop it."""
    rec = tr.lorr_reconciliation(r=1)
    x, w, t = torch.randn(5, 6), torch.randn(10), torch.randn(10)
    with torch.no_grad():
        rec.apply(x, w, n=4)                                   # keeps W for w's values
    y, dy = torch.func.jvp(lambda w: rec.apply(x, w, n=4), (w,), (t,))
    ref, dref = torch.func.jvp(lambda w: x @ rec(4, 6, w=w, backend="torch").T, (w,), (t,))
    assert_close(y, ref)
    assert_close(dy, dref)
    assert dy.abs().sum() > 0


def test_a_mask_redrawn_per_call_is_never_kept(monkeypatch):
    """masking with fixed_mask=False draws a new mask every call: each no-grad small call builds its
    own W, the same sequence as with nothing kept."""
    x, w = torch.randn(5, 6), torch.randn(24)
    runs = []
    for keep in (True, False):
        monkeypatch.setattr(base, "CACHE_SMALL_W", keep)
        rec = tr.masking_reconciliation(fixed_mask=False, seed=3)
        with torch.no_grad():
            runs.append([rec.apply(x, w, n=4) for _ in range(3)])
    for a, e in zip(*runs):
        assert torch.equal(a, e)
    assert not torch.equal(runs[0][0], runs[0][1])


def test_kept_w_is_built_from_the_copy_kept_with_it(monkeypatch):
    """w written while its W is built (another thread's step): the kept pair still agrees."""
    rec = tr.lorr_reconciliation(r=1)
    x, w = torch.randn(5, 6), torch.randn(10)
    build = type(rec)._build
    monkeypatch.setattr(type(rec), "_build", lambda self, *a: (build(self, *a), w.add_(1))[0])
    with torch.no_grad():
        rec.apply(x, w, n=4)
        monkeypatch.setattr(type(rec), "_build", build)
        assert_close(rec.apply(x, w, n=4), _reference(rec, x, w, torch.zeros(4)))


def test_kept_w_follows_the_arguments_dtype_and_mode():
    rec = tr.hm_reconciliation(p=2, q=3)
    x, b = torch.randn(5, 6), torch.randn(4)
    w = torch.randn(rec.calculate_l(4, 6))
    y = rec.apply(x, w, n=4, bias=b)
    rec.layout = "tinybig"                                     # another W from the same w
    assert_close(rec.apply(x, w, n=4, bias=b), _reference(rec, x, w, b))
    assert not torch.allclose(rec.apply(x, w, n=4, bias=b), y)
    w64, x64, b64 = w.double(), x.double(), b.double()
    assert rec.apply(x64, w64, n=4, bias=b64).dtype == torch.float64
    rec = tr.hm_reconciliation(p=2, q=3)
    with torch.inference_mode():
        rec.apply(x, w, n=4, bias=b)
    xg = x.clone().requires_grad_()                            # W kept in inference mode cannot serve autograd
    y = rec.apply(xg, w, n=4, bias=b)
    assert_close(torch.autograd.grad(y.sum(), xg)[0], torch.ones(5, 4) @ rec(4, 6, w=w))


def test_kept_w_is_bounded_and_can_be_switched_off(monkeypatch):
    rec = tr.lorr_reconciliation(r=1)
    x = torch.randn(3, 6)
    for n in range(1, base._SMALL_KEYS + 8):
        rec.apply(x, torch.randn(rec.calculate_l(n, 6)), n=n)
        checked, kept = base._small_state(rec)
        assert 1 <= len(kept) <= base._SMALL_W_KEYS and len(checked) <= base._SMALL_KEYS
    wide = tr.lorr_reconciliation(r=base.BUILD_BELOW // 10 + 1)   # W is 4 x 6 but w is not small: not kept
    wide.apply(x, torch.randn(wide.calculate_l(4, 6)), n=4)
    assert not base._small_state(wide)[1]
    monkeypatch.setattr(base, "CACHE_SMALL_W", False)
    w = torch.randn(rec.calculate_l(4, 6))
    kept = set(base._small_state(rec)[1])
    for _ in range(2):
        assert_close(rec.apply(x, w, n=4), x @ rec(4, 6, w=w).T)
    assert set(base._small_state(rec)[1]) == kept   # W built each call (by the build or the fused apply), not kept


def test_kept_w_from_many_threads():
    """Threads calling one instance with different w (one w each): every result is its own w's."""
    import concurrent.futures
    rec = tr.dual_lphm_reconciliation(p=2, q=3, r=1)
    x = torch.randn(5, 6)
    ws = [torch.randn(rec.calculate_l(4, 6)) for _ in range(8)]
    refs = [_reference(rec, x, w, torch.zeros(4)) for w in ws]

    def run(i):
        return all(torch.allclose(rec.apply(x, ws[i], n=4).double(), refs[i], atol=1e-5) for _ in range(200))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert all(pool.map(run, [i % len(ws) for i in range(32)]))


def test_bad_input_after_good_calls_is_refused(monkeypatch):
    rec = tr.hm_reconciliation(p=2, q=3)
    x, w, b = torch.randn(5, 6), torch.randn(10), torch.randn(4)
    good = lambda **k: rec.apply(**{"x": x, "w": w, "n": 4, "bias": b, **k})   # noqa: E731
    good()
    with torch.no_grad():
        good()
    for k, exc, phrase in [(dict(bias=torch.randn(5)), ValueError, r"bias must have shape \(4,\)"),
                           (dict(bias=b.double()), TypeError, "bias has dtype"),
                           (dict(w=w.double()), TypeError, "w has dtype"), (dict(w=w[:9]), ValueError, "expects w of shape"),
                           (dict(n=True), ValueError, "n must be a positive int"), (dict(D=5), ValueError, "but D=5"),
                           (dict(x=x.int()), TypeError, "floating-point"), (dict(backend="nonsense"), ValueError, "unknown backend"),
                           (dict(backend=["cpu"]), ValueError, "unknown backend"),
                           (dict(backend="cuda"), dispatch.BackendUnavailable, "cuda")]:
        with torch.no_grad(), pytest.raises(exc, match=phrase):
            good(**k)
    monkeypatch.setenv("TINYRECON_BACKEND", "nonsense")
    with torch.no_grad(), pytest.raises(ValueError, match="unknown TINYRECON_BACKEND"):
        good()
    monkeypatch.delenv("TINYRECON_BACKEND")
    rec.p = 3                                                  # 3 does not divide n=4
    with torch.no_grad(), pytest.raises(ValueError, match="p=3 must be a positive divisor of n=4"):
        good()
    rec.p = 2
    monkeypatch.setattr(base, "BUILD_BELOW", 0)                # the structured apply again
    structured = _counting(monkeypatch, rec, "_apply_flat")
    with torch.no_grad():
        assert_close(good(), _reference(rec, x, w, b))
    assert structured


@pytest.mark.parametrize("family", ["hm", "lorr", "random_matrix_adaption"])
def test_kept_w_stays_out_of_compiled_graphs(family):
    """torch.compile traces the build, never a kept W: the compiled call follows w."""
    rec = tr.reconciliation(family, **SMALL[family])
    x, b = torch.randn(3, 6), torch.randn(4)
    w = torch.randn(rec.calculate_l(4, 6))
    fn = lambda x, w, b: rec.apply(x, w, n=4, bias=b)   # noqa: E731
    with torch.no_grad():
        fn(x, w, b)                                            # W kept for these values
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        assert_close(compiled(x, w, b), _reference(rec, x, w, b))
        w.mul_(3)
        assert_close(compiled(x, w, b), _reference(rec, x, w, b))


# ---- the CPU library's fused train step (cpu_ops.small_linear) ---------------------------------------
needs_cpu_library = pytest.mark.skipif(bool(dispatch.why_not("cpu", None, "cpu")),
                                       reason=dispatch.why_not("cpu", None, "cpu") or "")
FUSED_CASES = [(f, {}) for f in sorted(FUSED)] + [(f, dict(layout="tinybig")) for f in
                                                  ("hm", "lphm", "dual_lphm", "duplicated_padding")]


def _fused_calls(monkeypatch):
    from tinyrecon import cpu_ops
    calls = []
    monkeypatch.setattr(cpu_ops._SmallLinear, "forward",
                        staticmethod(lambda *a, f=cpu_ops._SmallLinear.forward: calls.append(1) or f(*a)))
    return calls


# x: (*batch, D) as given, a transposed (non-contiguous) view, or enough rows for torch's GEMMs (N*n*D
# above cpu_ops._SMALL_GEMM)
X_KINDS = {"rows": lambda D, g: torch.randn(5, D, generator=g), "batch": lambda D, g: torch.randn(2, 3, D, generator=g),
           "empty": lambda D, g: torch.randn(0, D, generator=g), "strided": lambda D, g: torch.randn(D, 7, generator=g).T,
           "tall": lambda D, g: torch.randn(3000, D, generator=g)}


@needs_cpu_library
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("x_kind", list(X_KINDS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("family,kwargs", FUSED_CASES, ids=lambda v: str(v) if v else "kron")
def test_fused_train_step_matches_the_reference(family, kwargs, dtype, x_kind, with_bias, monkeypatch):
    n, D = 6, 9
    rec = tr.reconciliation(family, **{**SMALL[family], **SIZES[(n, D)].get(family, {}), **kwargs})
    gen = torch.Generator().manual_seed(1)
    x = X_KINDS[x_kind](D, gen).double()
    w = torch.randn(rec.calculate_l(n, D), generator=gen, dtype=torch.float64)
    bias = torch.randn(n, generator=gen, dtype=torch.float64) if with_bias else None
    calls = _fused_calls(monkeypatch)
    leaves = [t.to(dtype).requires_grad_() for t in (x, w) + ((bias,) if with_bias else ())]
    y = rec.apply(leaves[0], leaves[1], n=n, bias=leaves[2] if with_bias else None)
    assert calls == [1]
    ref_leaves = [t.detach().requires_grad_() for t in (x, w) + ((bias,) if with_bias else ())]
    ref = torch.nn.functional.linear(ref_leaves[0], rec(n, D, w=ref_leaves[1], backend="torch"),
                                     ref_leaves[2] if with_bias else None)
    assert y.shape == ref.shape and y.dtype == dtype
    assert_close(y, ref)
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    for a, e in zip(torch.autograd.grad(y, leaves, g.to(dtype)), torch.autograd.grad(ref, ref_leaves, g)):
        assert_close(a, e, dtype)


@needs_cpu_library
@pytest.mark.parametrize("family,kwargs", FUSED_CASES, ids=lambda v: str(v) if v else "kron")
def test_fused_train_step_gradcheck_and_double_backward(family, kwargs, monkeypatch):
    rec = tr.reconciliation(family, **{**SMALL[family], **kwargs})
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(rec.calculate_l(4, 6), dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    calls = _fused_calls(monkeypatch)
    fn = lambda x, w, b: rec.apply(x, w, n=4, bias=b)   # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b)) and torch.autograd.gradgradcheck(fn, (x, w, b))
    assert calls


@needs_cpu_library
def test_fused_train_step_leaves_what_it_cannot_take_to_the_build(monkeypatch):
    """Forward-mode AD, a strided w, and a function whose build takes something other than slices of w
    run the build and F.linear (values and gradients still the reference's)."""
    from torch.autograd import forward_ad

    class Scaled(tr.hm_reconciliation):   # A is 2 * a slice of w: not a view of it
        def _op_args(self, n, D, w):
            A, _, B, _ = super()._op_args(n, D, w)
            return 2 * A, None, B, None

    rec = tr.hm_reconciliation(p=2, q=3)
    x, b = torch.randn(5, 6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    calls = _fused_calls(monkeypatch)
    wide = torch.randn(2 * rec.calculate_l(4, 6), dtype=torch.float64)
    strided = wide[::2].requires_grad_()
    assert_close(rec.apply(x, strided, n=4, bias=b), _reference(rec, x, strided, b))
    t = torch.randn_like(strided)
    A, B = strided.detach()[:6].reshape(2, 3), strided.detach()[6:].reshape(2, 2)
    tA, tB = t[:6].reshape(2, 3), t[6:].reshape(2, 2)
    expected = x @ (torch.kron(tA, B) + torch.kron(A, tB)).T
    with forward_ad.dual_level():
        y = rec.apply(x, forward_ad.make_dual(strided.detach().contiguous().requires_grad_(), t), n=4, bias=b)
        assert_close(forward_ad.unpack_dual(y).tangent, expected)
    scaled = Scaled(p=2, q=3)
    w = torch.randn(scaled.calculate_l(4, 6), dtype=torch.float64, requires_grad=True)
    y = scaled.apply(x, w, n=4, bias=b)
    A, B = w[:6].reshape(2, 3), w[6:].reshape(2, 2)
    expected = x @ torch.kron(2 * A, B).T + b
    assert_close(y, expected)
    assert_close(torch.autograd.grad(y.sum(), w)[0], torch.autograd.grad(expected.sum(), w)[0])
    assert not calls


@needs_cpu_library
def test_fused_train_steps_from_many_threads():
    import concurrent.futures
    rec = tr.dual_lphm_reconciliation(p=2, q=3, r=1)
    x = torch.randn(5, 6, dtype=torch.float64)
    ws = [torch.randn(rec.calculate_l(4, 6), dtype=torch.float64, requires_grad=True) for _ in range(8)]

    def step(w):
        return [torch.autograd.grad(rec.apply(x, w, n=4).sum(), w)[0] for _ in range(50)]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(step, ws))
    for w, grads in zip(ws, results):
        expected = torch.autograd.grad((x @ rec(4, 6, w=w, backend="torch").T).sum(), w)[0]
        for g in grads:
            assert_close(g, expected)
