"""Bad input fails at the point of the mistake with a clear message; edge cases give natural results.

``BAD`` is one table: (what is wrong, a call making that mistake, the exception type, a phrase
of its message). Rows that reach an op run once per backend, so every backend refuses the same
way (the checks come before dispatch).
"""
import math
import warnings
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.autograd import gradgradcheck

import tinyrecon as tr
from tinyrecon import dispatch, registry

from conftest import DEVICE, backends_for

N, D = 4, 6
PQ_FAMILIES = ["hm", "lphm", "dual_lphm", "duplicated_padding", "duplicated_diagonal_padding"]
# a working instance of every function at n=4, D=6: its class's example arguments
SMALL = {f: cls.examples.get((N, D), {}) for f, cls in registry.CLASSES.items()}
WITH_W = [f for f in SMALL if tr.reconciliation(f, **SMALL[f]).calculate_l(N, D)]


def make(family, **kw):
    return tr.reconciliation(family, **{**SMALL[family], **kw})


def call_apply(family, backend, w=None, channels=1, **kw):
    rec = make(family)
    l = rec.calculate_l(N, D)
    w = torch.randn(channels, l) if w is None else w
    return rec.apply(torch.randn(3, D), w if l else None, n=N, backend=backend, **kw)


def load_state(family, state):
    rec = make(family)
    sd = rec.state_dict()
    sd["_extra_state"] = state
    rec.load_state_dict(sd)


def static_false_hypernet():
    rec = tr.hypernet_reconciliation(l=5, hidden_dim=3, static=False, seed=1)
    rec.setup(N, D)
    return rec


def yaml_config(text):
    return tr.from_config(yaml.safe_load(text))


def refused_before_any_op(call):
    """``call(backend)`` with dispatch failing loudly: a huge call must be refused before an op runs
    (one that got through would run for hours here)."""
    def guarded(backend):
        with mock.patch.object(dispatch, "get", side_effect=AssertionError("an op was dispatched")):
            return call(backend)
    return guarded


@refused_before_any_op
def huge_hypernet(backend):
    x = torch.randn(1, 2**16)
    return make("hypernet").apply(x, torch.randn(5), n=2**19, backend=backend)   # 2**35 * (hidden_dim + 1) numbers


@refused_before_any_op
def huge_rmh(backend):
    return make("random_matrix_hypernet")(n=2**19, D=2**16, w=torch.randn(5), backend=backend)   # 2**35 * r


@refused_before_any_op
def huge_rma(backend):   # A and B at rank 2**19: (n + D) * r = 2**36 numbers
    return make("random_matrix_adaption", r=2**19).apply(torch.randn(1, 2**16), torch.randn(2**16 + 2**19), n=2**16,
                                                         backend=backend)


BAD = []   # (call(backend), exception, phrase, backend)


def row(id_, call, exc, phrase, per_backend=False):
    """One mistake; ``per_backend``: it reaches an op, so it is tried on every backend."""
    for backend in dispatch.BACKENDS if per_backend else ("torch",):
        BAD.append(pytest.param(call, exc, phrase, backend, id=f"{id_}-{backend}" if per_backend else id_))


for fam in PQ_FAMILIES:
    for name in ("p", "q"):
        for bad in (0, -2, 2.0, True, "2"):
            row(f"{fam}-{name}={bad!r}", lambda b, fam=fam, name=name, bad=bad: make(fam, **{name: bad}),
                ValueError, f"{name} must be a positive int")
for fam, name in [("hypernet", "l"), ("hypernet", "hidden_dim"), ("random_matrix_hypernet", "l"),
                  ("random_matrix_hypernet", "hidden_dim"), ("random_matrix_hypernet", "r"), ("lorr", "r"),
                  ("dual_lphm", "r")]:
    row(f"{fam}-{name}=0", lambda b, fam=fam, name=name: make(fam, **{name: 0}), ValueError,
        f"{name} must be a positive int")
row("yaml-fixed_mask-string", lambda b: yaml_config(
    "function_class: masking_reconciliation\nfunction_parameters: {fixed_mask: 'no'}"),
    TypeError, "fixed_mask must be True or False")
row("yaml-static-string", lambda b: yaml_config(
    "function_class: hypernet_reconciliation\nfunction_parameters: {static: 'false'}"),
    TypeError, "static must be True or False")
row("config-enable_bias-string", lambda b: tr.from_config(
    {"function_class": "lorr_reconciliation", "function_parameters": {"enable_bias": "true"}}),
    TypeError, "enable_bias must be True or False")
row("config-parameters-list", lambda b: tr.from_config(
    {"function_class": "lorr_reconciliation", "function_parameters": [1, 2]}), TypeError, "must be a mapping")
for fam in WITH_W:
    row(f"{fam}-w-0-channels", lambda b, fam=fam: call_apply(fam, b, channels=0), ValueError, "0 channels", True)
for fam in SMALL:
    row(f"{fam}-bias-float", lambda b, fam=fam: call_apply(fam, b, bias=0.5), TypeError, "bias must be a tensor", True)
    row(f"{fam}-backend-nonsense", lambda b, fam=fam: call_apply(fam, "nonsense"), ValueError, "unknown backend")
    row(f"{fam}-constructor-backend-nonsense", lambda b, fam=fam: make(fam, backend="nonsense"), ValueError,
        "unknown backend")
row("hypernet-static-False-fp64-w", lambda b: static_false_hypernet().apply(
    torch.randn(3, D, dtype=torch.float64), torch.randn(5, dtype=torch.float64), n=N, backend=b),
    TypeError, "hypernet's parameters are torch.float32", True)
row("hypernet-static-False-other-shape", lambda b: static_false_hypernet()(n=2, D=6, w=torch.randn(5), backend=b),
    ValueError, r"set up for \(n, D\) = \(4, 6\)", True)
for fam in ("masking", "random_matrix_adaption", "hypernet", "random_matrix_hypernet"):
    row(f"{fam}-state-without-seed", lambda b, fam=fam: load_state(fam, {"calls": 3}), ValueError, "with 'seed'")
    for seed in (-1, 2**64 + 5, "7"):
        row(f"{fam}-state-seed={seed!r}", lambda b, fam=fam, seed=seed: load_state(fam, {"seed": seed}),
            ValueError, "seed must be an int in")
row("masking-state-calls=-1", lambda b: load_state("masking", {"seed": 1, "calls": -1}), ValueError,
    "call count must be a non-negative int")
row("hypernet-n=2**19-D=2**16", huge_hypernet, ValueError, "TINYRECON_MAX_RANDOM", True)
row("random_matrix_hypernet-n=2**19-D=2**16", huge_rmh, ValueError, "TINYRECON_MAX_RANDOM", True)
row("random_matrix_adaption-r=2**19-n=D=2**16", huge_rma, ValueError, "TINYRECON_MAX_RANDOM", True)
row("hypernet-setup-n=D=2**16", lambda b: tr.hypernet_reconciliation(static=False).setup(2**16, 2**16),
    ValueError, "TINYRECON_MAX_RANDOM")
row("layer-channels=0", lambda b: tr.ReconciledLinear(D, N, "lorr", channels=0), ValueError,
    "channels must be a positive int")


def double_backward(family, what, backend):
    """The gradient of w with create_graph=True through ``apply`` or the build, then its own gradient."""
    rec = make(family)
    x = torch.randn(3, D, dtype=torch.float64, device=DEVICE)
    w = torch.randn(rec.calculate_l(N, D), dtype=torch.float64, device=DEVICE, requires_grad=True)
    y = rec.apply(x, w, n=N, backend=backend) if what == "apply" else rec(N, D, w=w, backend=backend)
    gw, = torch.autograd.grad(y.square().sum(), w, create_graph=True)
    gw.square().sum().backward()


def on_backend(backend, op):
    """The skip marks of ``backend`` for ``op`` on this machine."""
    return next(p.marks for p in backends_for(op) if p.id == backend)


# Triton ops whose backward launches first-order kernels refuse create_graph=True by name (the
# others are differentiated again: test_double_backward_on_triton); CUDA's: test_cuda.py.
TRITON_FIRST_ORDER = [("hm", "apply", "kron_apply"), ("dual_lphm", "apply", "kron_apply"),
                      ("duplicated_padding", "apply", "duplicated_padding_apply"),
                      ("duplicated_diagonal_padding", "apply", "duplicated_diagonal_padding_apply"),
                      ("masking", "apply", "masking_apply"), ("hypernet", "apply", "hypernet_apply"),
                      ("hypernet", "build", "hypernet_build"), ("random_matrix_hypernet", "apply", "random_matrix_hypernet_apply"),
                      ("random_matrix_hypernet", "build", "random_matrix_hypernet_build")]
for fam, what, op in TRITON_FIRST_ORDER:
    BAD.append(pytest.param(lambda b, fam=fam, what=what: double_backward(fam, what, b), RuntimeError,
                            r"tinyrecon::triton_\w+ \(the triton backend\) has a first-order backward only.*"
                            r"backend='torch'", "triton", id=f"{fam}-{what}-double-backward-triton",
                            marks=on_backend("triton", op)))


@pytest.mark.parametrize("call, exc, phrase, backend", BAD)
def test_bad_input_is_refused_where_it_is_given(call, exc, phrase, backend):
    with pytest.raises(exc, match=phrase):
        call(backend)


@pytest.mark.parametrize("family", sorted(SMALL))
def test_garbage_backend_variable_is_refused_by_every_function(family, monkeypatch):
    monkeypatch.setenv("TINYRECON_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown TINYRECON_BACKEND 'nonsense'"):
        call_apply(family, None)
    with pytest.raises(ValueError, match="unknown TINYRECON_BACKEND 'nonsense'"):
        make(family)(n=N, D=D, w=torch.randn(make(family).calculate_l(N, D)) if family in WITH_W else None)


@pytest.mark.parametrize("family", sorted(SMALL))
def test_numpy_integers_are_ints_everywhere(family):
    rec = make(family)
    n, d = np.int64(N), np.int32(D)
    l = rec.calculate_l(n, d)
    assert type(l) is int and l == rec.calculate_l(N, D)
    w = torch.randn(l) if l else None
    assert torch.equal(rec(n, d, w=w), rec(N, D, w=w))
    x = torch.randn(2, D)
    assert torch.equal(rec.apply(x, w, n=n), rec.apply(x, w, n=N))
    if family in PQ_FAMILIES:
        assert make(family, p=np.int64(2)).p == 2 and type(make(family, p=np.int64(2)).p) is int
    layer = tr.ReconciledLinear(d, n, rec, channels=np.int64(1))
    assert layer.in_features == D and type(layer.out_features) is int


@pytest.mark.parametrize("family", ["constant", "zero", "one", "constant_eye"])
@pytest.mark.parametrize("channels", [1, 2])
def test_outputs_are_fresh_writable_tensors(family, channels):
    rec = make(family)
    x = torch.randn(3, D)
    w = torch.empty(channels, 0)
    for y in (rec.apply(x, w, n=N), rec(N, D, w=w)):
        assert 0 not in y.stride()
        expected = y.clone()
        y[..., 0, 0] = 7.0     # one element, not a broadcast row
        expected[..., 0, 0] = 7.0
        assert torch.equal(y, expected)
        y.add_(1.0)            # in place works


# ---- NaN / inf ---------------------------------------------------------------------------------
# Policy (README "Non-finite inputs"): a structured apply computes only the products W's structure
# has, so a NaN or inf in x reaches exactly the outputs whose row of W has a structural nonzero in
# its column. For dense structure that is every output (as F.linear); for constant_eye and
# duplicated_diagonal_padding, whose W has structural zeros, F.linear's 0 * inf = NaN elsewhere is
# not reproduced.
SKIPS_STRUCTURAL_ZEROS = {"constant_eye", "duplicated_diagonal_padding"}


@pytest.mark.parametrize("family", sorted(SMALL))
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_x_follows_the_documented_policy(family, bad):
    rec = make(family, **({"p": 2, "q": 2} if family == "duplicated_diagonal_padding" else {}))
    l = rec.calculate_l(N, D)
    w = torch.randn(l) if l else None
    x = torch.randn(2, D)
    x[0, D - 1] = bad           # the last column: outside eye(4, 6)'s reach, in the second diagonal block
    y = rec.apply(x, w, n=N)
    W = rec(N, D, w=w)
    if family in SKIPS_STRUCTURAL_ZEROS:
        reached = W[:, D - 1] != 0
        assert torch.equal(~torch.isfinite(y[0]), reached)
        assert torch.isfinite(y[1]).all()
    else:
        assert torch.equal(torch.isfinite(y), torch.isfinite(F.linear(x, W)))


# ---- autograd ------------------------------------------------------------------------------------
SECOND_ORDER = ["dual_lphm", "lorr", "duplicated_diagonal_padding", "random_matrix_adaption", "hm",
                "duplicated_padding"]
GRAD_OPS = {"dual_lphm": "kron_apply", "hm": "kron_apply", "lorr": "lorr_apply",
            "duplicated_diagonal_padding": "duplicated_diagonal_padding_apply", "duplicated_padding": "duplicated_padding_apply",
            "random_matrix_adaption": "random_matrix_adaption_apply"}


def second_order_params():
    return [pytest.param(f, b.values[0], id=f"{f}-{b.id}", marks=b.marks) for f in SECOND_ORDER
            for b in backends_for(GRAD_OPS[f]) if b.values[0] in ("torch", "cpu")]


@pytest.mark.parametrize("family, backend", second_order_params())
def test_double_backward(family, backend):
    """create_graph=True works (e.g. gradient penalties). Most Triton and CUDA backward ops are
    first-order only and refuse it by name (the table above, test_cuda.py)."""
    rec = make(family)
    x = torch.randn(3, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(rec.calculate_l(N, D), dtype=torch.float64, requires_grad=True)
    bias = torch.randn(N, dtype=torch.float64, requires_grad=True)
    assert gradgradcheck(lambda x, w, b: rec.apply(x, w, n=N, bias=b, backend=backend), (x, w, bias))


# Triton's low-rank backward is made of its bmm, which has a backward of its own; the builds of
# the Kronecker, padding and masking families have backward passes in torch ops or the build kernel.
TRITON_SECOND_ORDER = [("lorr", "apply", "lorr_apply"), ("random_matrix_adaption", "apply", "random_matrix_adaption_apply")] + [
    (fam, "build", op) for fam, op in [("lorr", "lorr_build"), ("random_matrix_adaption", "random_matrix_adaption_build"),
                                       ("hm", "kron_build"), ("dual_lphm", "kron_build"),
                                       ("duplicated_padding", "duplicated_padding_build"),
                                       ("duplicated_diagonal_padding", "duplicated_diagonal_padding_build"),
                                       ("masking", "masking_build")]]


@pytest.mark.parametrize("family, what", [pytest.param(f, what, id=f"{f}-{what}", marks=on_backend("triton", op))
                                          for f, what, op in TRITON_SECOND_ORDER])
def test_double_backward_on_triton(family, what):
    rec = make(family)
    w = torch.randn(rec.calculate_l(N, D), dtype=torch.float64, device=DEVICE, requires_grad=True)
    if what == "build":
        assert gradgradcheck(lambda w: rec(N, D, w=w, backend="triton"), (w,))
        return
    x = torch.randn(3, D, dtype=torch.float64, device=DEVICE, requires_grad=True)
    bias = torch.randn(N, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert gradgradcheck(lambda x, w, b: rec.apply(x, w, n=N, bias=b, backend="triton"), (x, w, bias))


@pytest.mark.parametrize("family, backend", second_order_params())
def test_torch_func_vmap_and_jacrev(family, backend):
    rec = make(family)
    w = torch.randn(rec.calculate_l(N, D), dtype=torch.float64)
    x = torch.randn(5, D, dtype=torch.float64)
    W = rec(N, D, w=w)
    with warnings.catch_warnings():   # batched torch ops, not the per-sample fallback torch warns about
        warnings.simplefilter("error")
        y = torch.func.vmap(lambda xi: rec.apply(xi[None], w, n=N, backend=backend)[0])(x)
        jx, jw = torch.func.jacrev(lambda x, w: rec.apply(x, w, n=N, backend=backend), argnums=(0, 1))(x, w)
    torch.testing.assert_close(y, x @ W.T)
    torch.testing.assert_close(jx, torch.einsum("ij,bc->bicj", W, torch.eye(5, dtype=torch.float64)))
    jw_ref = torch.func.jacrev(lambda w: x @ rec(N, D, w=w, backend="torch").T)(w)
    torch.testing.assert_close(jw, jw_ref)


# ---- size limits -------------------------------------------------------------------------------
# What one call draws at n=4, D=6 with SMALL's sizes, counted by hand.
DRAWS = {"hypernet": 3 * (5 + 1) + 4 * 6 * (3 + 1),      # (W1, b1), (W2, b2)
         "random_matrix_hypernet": 2 * (5 + 3 + 3 + 4 * 6),   # P, Q, S, T at r=2
         "random_matrix_adaption": (4 + 6) * 2,             # A, B at r=2
         "masking": 4 * 6}                                  # the mask
DRAW_OPS = {"hypernet": "hypernet", "random_matrix_hypernet": "random_matrix_hypernet", "random_matrix_adaption": "random_matrix_adaption",
            "masking": "masking"}


def drawing_params():
    """(family, backend) for every backend with an op for the family (runnable here or skipped)."""
    return [pytest.param(f, b.values[0], id=f"{f}-{b.id}", marks=b.marks) for f in DRAWS
            for b in backends_for(f"{DRAW_OPS[f]}_apply")
            if b.id != "cuda" or dispatch.implementation(f"{DRAW_OPS[f]}_apply", b.id)]


@pytest.mark.parametrize("what", ["apply", "build"])
@pytest.mark.parametrize("family, backend", drawing_params())
def test_random_number_limit_holds_on_every_backend(family, backend, what, monkeypatch):
    """Counted before dispatch, for what the call draws; TINYRECON_MAX_RANDOM is the override."""
    rec, count = make(family), DRAWS[family]
    x, w = torch.randn(2, D, device=DEVICE), torch.randn(rec.calculate_l(N, D), device=DEVICE)

    def call():
        return rec.apply(x, w, n=N, backend=backend) if what == "apply" else rec(N, D, w=w, backend=backend)

    monkeypatch.setenv("TINYRECON_MAX_RANDOM", str(count - 1))
    with mock.patch.object(dispatch, "get", side_effect=AssertionError("an op was dispatched")):
        with pytest.raises(ValueError, match=rf"{type(rec).__name__} at n=4, D=6 would draw {count} random "
                                             rf"numbers.*TINYRECON_MAX_RANDOM={count} to run it anyway"):
            call()
    monkeypatch.setenv("TINYRECON_MAX_RANDOM", str(count))
    assert call().shape == ((2, N) if what == "apply" else (N, D))


@pytest.mark.parametrize("family", sorted(DRAWS))
def test_nothing_is_drawn_or_refused_on_the_meta_device(family, monkeypatch):
    monkeypatch.setenv("TINYRECON_MAX_RANDOM", "0")
    rec = make(family)
    w = torch.randn(rec.calculate_l(N, D), device="meta")
    assert rec(N, D, w=w).shape == (N, D)
    assert rec.apply(torch.randn(2, D, device="meta"), w, n=N).shape == (2, N)


def test_masking_on_the_meta_device_at_2_to_the_32_is_immediate():
    rec = make("masking")
    w = torch.empty(2**32, device="meta")
    assert rec(n=2**16, D=2**16, w=w).shape == (2**16, 2**16)
