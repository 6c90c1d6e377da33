"""Public API shared by all functions: shapes, channels, dtypes, errors, registry, seeds."""
import io

import pytest
import torch

import tinyrecon as tr
from conftest import assert_close

SMALL = dict(hidden_dim=6, l=5)


def make(cls, **kw):
    return cls(**SMALL, **kw) if "hypernet" in cls.__name__ else cls(**kw)


ALL = pytest.mark.parametrize("cls", tr.ALL, ids=[c.__name__ for c in tr.ALL])


@ALL
def test_shapes_and_channels(cls):
    rec = make(cls)
    n, D = 6, 12
    l = rec.calculate_l(n, D)
    w = torch.randn(3, l, dtype=torch.float64)
    x = torch.randn(2, 5, D, dtype=torch.float64)
    W = rec(w=w, n=n, D=D)
    assert W.shape == (3, n, D)
    assert rec(w=w[0], n=n, D=D).shape == (n, D)
    assert rec(w=w[:1], n=n, D=D).shape == (n, D)          # tinyBIG's (1, l)
    y = rec.apply(x, w, n=n)
    assert y.shape == (3, 2, 5, n)
    for c in range(3):   # each channel is its own function of the shared x
        assert_close(y[c], x @ W[c].T)
        assert_close(rec.apply(x, w[c], n=n), x @ W[c].T)


@ALL
def test_empty_batch(cls):
    rec = make(cls)
    n, D = 4, 6
    w = torch.randn(rec.calculate_l(n, D))
    y = rec.apply(torch.randn(0, D), w, n=n, bias=torch.randn(n))
    assert y.shape == (0, n)
    y.sum().backward() if y.requires_grad else None


@ALL
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_follow_input(cls, dtype):
    rec = make(cls)
    n, D = 4, 6
    w64 = torch.randn(rec.calculate_l(n, D), dtype=torch.float64)
    x64 = torch.randn(3, D, dtype=torch.float64)
    y = rec.apply(x64.to(dtype), w64.to(dtype), n=n)
    assert y.dtype == dtype
    # Same inputs, rounded to dtype, computed in float64: the reference rounds once at the end.
    W = rec(w=w64.to(dtype).double(), n=n, D=D)
    assert_close(y, x64.to(dtype).double() @ W.T, dtype)


@ALL
def test_integer_w_is_a_type_error(cls):
    rec = make(cls)
    l = rec.calculate_l(4, 6)
    if l:
        with pytest.raises(TypeError, match="floating-point"):
            rec(w=torch.ones(l, dtype=torch.int64), n=4, D=6)


@ALL
def test_wrong_l_names_formula(cls):
    rec = make(cls)
    l = rec.calculate_l(6, 12)
    if not l:
        return
    with pytest.raises(ValueError, match=f"l = .*{l}") as e:
        rec(w=torch.randn(l + 1), n=6, D=12)
    assert f"({l + 1},)" in str(e.value)


@ALL
@pytest.mark.parametrize("n,D", [(0, 4), (4, 0), (-1, 3), (2.0, 3)])
def test_n_and_D_must_be_positive_ints(cls, n, D):
    with pytest.raises(ValueError, match="positive int"):
        make(cls)(w=None, n=n, D=D)


def test_x_last_dim_must_be_D():
    rec = tr.hm_reconciliation(p=2, q=3)
    w = torch.randn(rec.calculate_l(6, 12))
    with pytest.raises(ValueError, match="x's last dimension is 10 but D=12"):
        rec.apply(torch.randn(3, 10), w, n=6, D=12)
    with pytest.raises(ValueError, match="divisor of D=10"):   # D read from x
        rec.apply(torch.randn(3, 10), w, n=6)
    with pytest.raises(ValueError, match=r"l = p\*q \+ s\*t = 2\*4 \+ 3\*5 = 23; got \(18,\)"):
        tr.hm_reconciliation(p=2).apply(torch.randn(3, 20), w, n=6)   # q = 4 chosen for D=20


def test_mismatched_device_dtype_and_bias():
    rec = tr.lorr_reconciliation(r=1)
    w = torch.randn(18)
    with pytest.raises(TypeError, match="dtype"):
        rec.apply(torch.randn(2, 12, dtype=torch.float64), w, n=6)
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        rec.apply(torch.randn(2, 12), w, n=6, bias=torch.randn(5))
    with pytest.raises(ValueError, match="device"):
        rec.apply(torch.randn(2, 12, device="meta"), w, n=6)
    with pytest.raises(ValueError, match="output width n"):
        rec.apply(torch.randn(2, 12), w)


def test_p_q_must_divide():
    with pytest.raises(ValueError, match=r"p=4 must be a positive divisor of n=6; divisors of 6: \[1, 2, 3, 6\]"):
        tr.hm_reconciliation(p=4, q=3).calculate_l(6, 12)
    with pytest.raises(ValueError, match=r"q=5 .* D=12; divisors of 12: \[1, 2, 3, 4, 6, 12\]"):
        tr.dual_lphm_reconciliation(p=2, q=5).calculate_l(6, 12)
    with pytest.raises(ValueError, match="divisor of D"):
        tr.duplicated_padding_reconciliation(p=2, q=5).calculate_l(6, 12)


def test_spec_l_examples():
    n, D = 6, 12
    assert tr.hm_reconciliation().calculate_l(n, D) == 18
    assert tr.lphm_reconciliation(r=1).calculate_l(n, D) == 13
    assert tr.dual_lphm_reconciliation(r=1).calculate_l(n, D) == 12
    assert tr.duplicated_padding_reconciliation(p=2, q=2).calculate_l(n, D) == 18
    assert tr.lorr_reconciliation(r=1).calculate_l(n, D) == 18
    assert tr.hm_reconciliation(p=2, q=2).calculate_l(n, D) == 22
    assert tr.dual_lphm_reconciliation(p=8, q=784, r=5).calculate_l(64, 615440) == 5 * (8 + 784 + 8 + 785)


@pytest.mark.parametrize("k,f", [(6, 2), (12, 3), (64, 8), (784, 28), (615440, 784), (13, 1), (1, 1)])
def test_close_factor(k, f):
    from tinyrecon.base import close_factor
    assert close_factor(k) == f


def test_registry():
    a = tr.reconciliation("dual_lphm", p=8, q=784, r=5)
    b = tr.reconciliation("tinybig.reconciliation.dual_lphm_reconciliation", p=8, q=784, r=5)
    assert type(a) is type(b) is tr.dual_lphm_reconciliation
    assert (a.p, a.q, a.r) == (8, 784, 5)
    assert tr.lookup("low_rank") is tr.lorr_reconciliation
    assert len({tr.lookup(c.__name__) for c in tr.ALL}) == 15
    with pytest.raises(ValueError, match="known: .*dual_lphm"):
        tr.reconciliation("dual_lphn")
    with pytest.raises(TypeError, match="unexpected"):
        tr.reconciliation("hm", p=2, qq=3)


def test_unknown_layout_and_backend():
    with pytest.raises(ValueError, match="layout"):
        tr.hm_reconciliation(layout="outer")
    with pytest.raises(ValueError, match="backend"):
        tr.hm_reconciliation(backend="numpy")


@pytest.mark.parametrize("cls", [tr.masking_reconciliation, tr.random_matrix_adaption_reconciliation,
                                 tr.hypernet_reconciliation, tr.random_matrix_hypernet_reconciliation])
def test_seed_round_trips(cls):
    torch.manual_seed(1)
    a = make(cls)
    n, D = 5, 7
    w = torch.randn(a.calculate_l(n, D))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    torch.manual_seed(2)
    b = make(cls)
    assert b.seed != a.seed
    assert not torch.equal(a(w=w, n=n, D=D), b(w=w, n=n, D=D))
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    assert torch.equal(a(w=w, n=n, D=D), b(w=w, n=n, D=D))
    assert torch.equal(a(w=w, n=n, D=D), make(cls, seed=a.seed)(w=w, n=n, D=D))
    torch.manual_seed(1)
    assert make(cls).seed == a.seed          # the default seed comes from torch's generator


def test_bad_seed():
    with pytest.raises(ValueError, match="seed"):
        tr.random_matrix_adaption_reconciliation(seed=-1)


def test_module_apply_still_works():
    # nn.Module.apply(fn) recurses into children: a reconciliation inside a model must not break it.
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), tr.hm_reconciliation())
    seen = []
    model.apply(lambda m: seen.append(type(m).__name__))
    assert "hm_reconciliation" in seen


def test_forward_device_argument():
    rec = tr.lorr_reconciliation(r=1)
    W = rec(n=6, D=12, w=torch.randn(1, 18), device="cpu")
    assert W.device.type == "cpu" and W.shape == (6, 12)


@ALL
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_bias_and_x_on_every_backend(cls, backend):
    from tinyrecon import dispatch
    if dispatch.why_not(backend, None, "cpu"):
        pytest.skip(dispatch.why_not(backend, None, "cpu"))
    rec = make(cls, **({"seed": 3} if "seed" in cls.__init__.__code__.co_varnames else {}))
    n, D = 6, 12
    w = torch.randn(2, rec.calculate_l(n, D), dtype=torch.float64)
    bias = torch.randn(2 * n, dtype=torch.float64)[::2]
    x = torch.randn(D, 5, dtype=torch.float64).T
    with tr.use_backend(backend):
        y = rec.apply(x, w, n=n, bias=bias)
    # Kernels draw frozen N(0,1) matrices in fp32 with the GPU's (here numpy's) libm: fp32 accuracy.
    random = backend != "torch" and hasattr(rec, "seed")
    assert_close(y, x @ rec(n=n, D=D, w=w, backend="torch").transpose(1, 2) + bias,
                 torch.float32 if random else None)
