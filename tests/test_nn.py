"""ReconciledLinear: module vs functional, channel fusion, parameters and gradients, state,
dtypes, torch.compile, and loading tinyBIG checkpoints."""
import copy
import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tinyrecon as tr
from conftest import DEVICE, TOL, assert_close
from test_api import ALL, make
from tinybig_ref import load
from tinyrecon import dispatch
from tinyrecon.nn import ReconciledLinear

N, D = 6, 12
F64 = torch.float64
SEEDED = [tr.masking_reconciliation, tr.random_matrix_adaption_reconciliation, tr.hypernet_reconciliation,
          tr.random_matrix_hypernet_reconciliation]
TUTORIAL = Path(__file__).parent / "data" / "reconciliation_function_config.yaml"


def layer_for(cls, channels=1, n=N, d=D, rec_kw=(), **kw):
    return ReconciledLinear(d, n, make(cls, **dict(rec_kw)), channels=channels, dtype=F64, **kw)


def scale(layer):
    """The layer's fixed output scale (init="linear" sets one for the hypernets only)."""
    return 1.0 if layer.output_scale is None else layer.output_scale


@ALL
@pytest.mark.parametrize("bias", [True, False])
def test_module_matches_functional(cls, bias):
    torch.manual_seed(0)
    layer = layer_for(cls, bias=bias)
    x = torch.randn(3, 4, 2 * D, dtype=F64)[..., ::2]      # non-contiguous
    y = layer(x)
    assert y.shape == (3, 4, N)
    functional = layer.reconciliation.apply(x, layer.w[0], n=N) * scale(layer)
    assert_close(y, functional if layer.bias is None else functional + layer.bias)
    expected = x @ layer.weight.T
    assert_close(y, expected if layer.bias is None else expected + layer.bias)
    assert layer(x[:0]).shape == (0, 4, N)


@ALL
@pytest.mark.parametrize("fusion", ["mean", "sum"])
def test_channel_fusion(cls, fusion):
    torch.manual_seed(0)
    layer = layer_for(cls, channels=3, channel_fusion=fusion)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(5, D, dtype=F64)
    rec = layer.reconciliation
    per_channel = torch.stack([rec.apply(x, layer.w[c], n=N) for c in range(3)])
    weights = torch.stack([rec(n=N, D=D, w=layer.w[c]) for c in range(3)])
    fuse = (lambda t: t.mean(0)) if fusion == "mean" else (lambda t: t.sum(0))
    assert_close(layer(x), fuse(per_channel) * scale(layer) + layer.bias)        # the bias is added once
    assert_close(layer.weight, fuse(weights) * scale(layer))


def _graph_leaves(y):
    """Every leaf tensor the autograd graph of ``y`` accumulates a gradient into."""
    leaves, seen, stack = [], set(), [y.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            leaves.append(fn.variable)
        stack.extend(f for f, _ in fn.next_functions)
    return leaves


@ALL
def test_gradient_reaches_w_and_bias_only(cls):
    torch.manual_seed(0)
    layer = layer_for(cls, channels=2)
    assert [name for name, _ in layer.named_parameters()] == ["w", "bias"]
    # frozen matrices are regenerated, never stored (a hypernet layer keeps one scalar output_scale)
    assert all(b.numel() == 1 for b in layer.buffers())
    y = layer(torch.randn(5, D, dtype=F64))
    assert {id(t) for t in _graph_leaves(y)} <= {id(layer.w), id(layer.bias)}
    y.square().sum().backward()
    assert layer.bias.grad.abs().sum() > 0
    if layer.l:
        assert layer.w.grad.abs().sum() > 0


@ALL
def test_gradcheck(cls):
    torch.manual_seed(0)
    layer = layer_for(cls, channels=2, n=4, d=6)
    x = torch.randn(3, 6, dtype=F64, requires_grad=True)

    def f(x, w, b):
        return torch.func.functional_call(layer, {"w": w, "bias": b}, (x,))
    assert torch.autograd.gradcheck(f, (x, layer.w.detach().clone().requires_grad_(),
                                        torch.randn(4, dtype=F64, requires_grad=True)))


def test_trainable_hypernet_exists_before_the_optimizer():
    torch.manual_seed(0)
    layer = layer_for(tr.hypernet_reconciliation, rec_kw=dict(static=False))
    names = [name for name, _ in layer.named_parameters()]
    assert names[:2] == ["w", "bias"] and any(n.startswith("reconciliation.net.") for n in names)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    net_before = [p.detach().clone() for p in layer.reconciliation.net.parameters()]
    layer(torch.randn(5, D, dtype=F64)).square().sum().backward()
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(net_before, layer.reconciliation.net.parameters()))


@ALL
def test_state_dict_round_trips(cls):
    x = torch.randn(5, D, dtype=F64)
    torch.manual_seed(1)
    a = layer_for(cls, channels=2)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    torch.manual_seed(2)
    b = layer_for(cls, channels=2)
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    assert torch.equal(a(x), b(x))
    if cls in SEEDED:
        assert a.state_dict()["reconciliation._extra_state"]["seed"] == b.reconciliation.seed


def test_trainable_hypernet_state_round_trips():
    x = torch.randn(5, D, dtype=F64)
    torch.manual_seed(1)
    a = layer_for(tr.hypernet_reconciliation, rec_kw=dict(static=False))
    torch.manual_seed(2)
    b = layer_for(tr.hypernet_reconciliation, rec_kw=dict(static=False))
    assert not torch.equal(a(x), b(x))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("name", ["dual_lphm", "lorr", "duplicated_padding", "random_matrix_adaption", "masking"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtype_conversions(name, dtype):
    torch.manual_seed(0)
    layer = ReconciledLinear(D, N, name, channels=2)
    layer.to(dtype)
    assert layer.w.dtype == layer.bias.dtype == dtype
    x = torch.randn(5, D).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    # The same (rounded) parameters and input in float64.
    expected = copy.deepcopy(layer).double()(x.double())
    assert_close(y, expected, dtype)
    assert layer.half().w.dtype == torch.float16


@pytest.mark.parametrize("name", ["dual_lphm", "lorr", "duplicated_padding", "random_matrix_adaption", "masking"])
def test_torch_compile_fullgraph(name):
    torch.manual_seed(0)
    layer = ReconciledLinear(D, N, name, channels=2, backend="torch")
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")   # traces forward and backward
    x = torch.randn(5, D)
    y = compiled(x)
    assert_close(y, layer(x))
    g, = torch.autograd.grad(y.sum(), layer.w)
    assert_close(g, torch.autograd.grad(layer(x).sum(), layer.w)[0])


@pytest.mark.parametrize("name,op", [("lorr", "lorr_apply"), ("duplicated_padding", "duplicated_padding_apply"),
                                     ("dual_lphm", "kron_apply"), ("random_matrix_adaption", "random_matrix_adaption_apply")])
@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_layer_runs_on_every_backend(name, op, backend):
    reason = dispatch.why_not(backend, op, torch.device(DEVICE).type)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    layer = ReconciledLinear(D, N, name, channels=2, backend=backend).to(DEVICE)
    x = torch.randn(5, D, device=DEVICE)
    reference = copy.deepcopy(layer)
    reference.backend = "torch"
    assert_close(layer(x), reference(x))


def test_init_tinybig_is_xavier_like_tinybig():
    torch.manual_seed(0)
    layer = ReconciledLinear(D, N, "lorr", channels=3, init="tinybig")
    torch.manual_seed(0)
    w, b = torch.empty(3, layer.l), torch.empty(N)
    torch.nn.init.xavier_uniform_(w)
    torch.nn.init.xavier_uniform_(b.view(1, -1))
    assert torch.equal(layer.w, w) and torch.equal(layer.bias, b) and layer.output_scale is None
    with pytest.raises(ValueError, match="init must be one of"):
        ReconciledLinear(D, N, "lorr", init="xavier")


TRAINABLE = [c for c in tr.ALL if make(c).calculate_l(N, D)]


@pytest.mark.parametrize("cls", TRAINABLE, ids=[c.__name__ for c in TRAINABLE])
@pytest.mark.parametrize("channels", [1, 3])
def test_init_linear_starts_at_nn_linear_scale(cls, channels):
    """The initial output on N(0, 1) inputs is about as large as nn.Linear's (RMS 1/sqrt(3) + bias)."""
    for n, d in ((8, 72), (64, 1056)):
        torch.manual_seed(1)
        layer = ReconciledLinear(d, n, make(cls, **({"p": 2} if "padding" in cls.__name__ else {})),
                                 channels=channels, bias=False)
        x = torch.randn(256, d)
        with torch.no_grad():
            ratio = layer(x).std().item() / torch.nn.Linear(d, n, bias=False)(x).std().item()
        assert 0.6 < ratio < 1.6, (n, d, ratio)


@pytest.mark.parametrize("cls", TRAINABLE, ids=[c.__name__ for c in TRAINABLE])
def test_init_linear_degree(cls):
    """``degree`` is psi's degree k in w (psi(c w) = c^k psi(w)); None where there is none."""
    rec = make(cls, **({"seed": 3} if cls in SEEDED else {}))
    w = torch.rand(rec.calculate_l(N, D), dtype=F64) + 0.5
    k = cls.degree
    if k is None:
        assert not any(torch.allclose(rec(n=N, D=D, w=3 * w), 3 ** j * rec(n=N, D=D, w=w)) for j in range(6))
    else:
        assert_close(rec(n=N, D=D, w=3 * w), 3 ** k * rec(n=N, D=D, w=w))


def test_init_linear_leaves_the_function_and_from_tinybig_alone():
    torch.manual_seed(0)
    layer = ReconciledLinear(D, N, tr.hypernet_reconciliation(l=5, hidden_dim=6, seed=2))
    assert layer.output_scale is not None and "output_scale" in layer.state_dict()
    copy_ = ReconciledLinear(D, N, tr.hypernet_reconciliation(l=5, hidden_dim=6, seed=9))
    copy_.load_state_dict(layer.state_dict())                 # the scale travels with the state
    x = torch.randn(4, D)
    assert torch.equal(copy_(x), layer(x))
    w = torch.randn(1, 2 * (N + D))
    old = ReconciledLinear.from_tinybig({"function_class": "tinybig.reconciliation.lorr_reconciliation",
                                         "function_parameters": {"r": 2}}, w, in_features=D, out_features=N)
    assert old.output_scale is None and old.init == "tinybig" and torch.equal(old.w, w)


def test_reconciliation_argument_forms():
    for spec in (tr.dual_lphm_reconciliation(p=2, q=3, r=1), TUTORIAL, str(TUTORIAL),
                 {"function_class": "tinybig.reconciliation.dual_lphm_reconciliation",
                  "function_parameters": {"p": 2, "q": 3, "r": 1}}):
        layer = ReconciledLinear(D, N, spec)
        assert type(layer.reconciliation) is tr.dual_lphm_reconciliation and layer.l == 12
    assert type(ReconciledLinear(D, N, "hm").reconciliation) is tr.hm_reconciliation


def test_repr():
    text = repr(ReconciledLinear(D, N, TUTORIAL, channels=2))
    assert ("in_features=12, out_features=6, bias=True, function=dual_lphm_reconciliation, l=12, "
            "compression=6 (n*D/l), channels=2, channel_fusion='mean'") in text
    assert "compression=inf" in repr(ReconciledLinear(D, N, "constant"))


def test_argument_errors():
    with pytest.raises(ValueError, match="channels must be a positive int"):
        ReconciledLinear(D, N, "hm", channels=0)
    with pytest.raises(ValueError, match="channel_fusion must be one of"):
        ReconciledLinear(D, N, "hm", channel_fusion="max")
    with pytest.raises(ValueError, match="n must be a positive int"):
        ReconciledLinear(D, 0, "hm")
    with pytest.raises(ValueError, match="x's last dimension is 10 but D=12"):
        ReconciledLinear(D, N, "lorr")(torch.randn(2, 10))
    with pytest.raises(ValueError, match="unknown reconciliation"):
        ReconciledLinear(D, N, "lorx")


# ---- tinyBIG checkpoints ------------------------------------------------------------
TB = load()
needs_tinybig = pytest.mark.skipif(TB is None, reason="tinybig not installed (pip install --no-deps tinybig==0.2.1)")

# s != 1 and q != 1 where tinyBIG's matrices are not Kronecker products.
CKPT = [
    ("hm_reconciliation", dict(p=2, q=3), 6, 12),
    ("lphm_reconciliation", dict(p=2, q=4, r=2), 6, 12),
    ("dual_lphm_reconciliation", dict(p=2, q=3, r=1), 6, 12),
    ("duplicated_padding_reconciliation", dict(p=3, q=2), 9, 6),
    ("duplicated_diagonal_padding_reconciliation", dict(p=5, q=5), 5, 15),   # tinyBIG needs p = q = n
    ("lorr_reconciliation", dict(r=2), 7, 11),
    ("identity_reconciliation", dict(), 4, 9),
    ("constant_eye_reconciliation", dict(), 3, 5),
]


def _tinybig_W(name, kw, n, d, w_c):
    W = getattr(TB, name)(**kw)(n=n, D=d, w=w_c, device="cpu")
    W = W.to_dense() if W.is_sparse else W
    return W.to(w_c.dtype)   # l = 0 functions build float32 whatever w is


@needs_tinybig
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name,kw,n,d", CKPT, ids=[f"{c[0]}-{c[2]}x{c[3]}" for c in CKPT])
def test_from_tinybig_matches_a_tinybig_head(name, kw, n, d, channels):
    config = {"parameter_fabrication_class": f"tinybig.reconciliation.{name}",
              "parameter_fabrication_parameters": {"name": name, **kw, "enable_bias": True}}
    l = getattr(TB, name)(**kw).calculate_l(n=n, D=d)
    w, b = torch.randn(channels, l, dtype=F64), torch.randn(n, dtype=F64)
    x = torch.randn(5, d, dtype=F64)
    # tinyBIG's head: F.linear(kappa(x), psi(w_c), b) per channel, then mean fusion.
    expected = torch.stack([F.linear(x, _tinybig_W(name, kw, n, d, w[c:c + 1]), b) for c in range(channels)]).mean(0)
    layer = ReconciledLinear.from_tinybig(config, w, b, in_features=d, out_features=n)
    torch.testing.assert_close(layer(x), expected, **TOL[F64])
    if channels == 1:
        assert torch.equal(layer.weight, _tinybig_W(name, kw, n, d, w))


@needs_tinybig
def test_the_default_layout_is_not_tinybigs():
    config = {"function_class": "tinybig.reconciliation.hm_reconciliation", "function_parameters": {"p": 2, "q": 3}}
    w = torch.randn(1, 18)
    old = ReconciledLinear.from_tinybig(config, w, in_features=D, out_features=N)
    new = ReconciledLinear(D, N, config, bias=False)
    with torch.no_grad():
        new.w.copy_(w)
    assert old.reconciliation.layout == "tinybig" and new.reconciliation.layout == "kron"
    x = torch.randn(3, D)
    assert not torch.allclose(old(x), new(x))


def test_from_tinybig_checks():
    config = {"function_class": "dual_lphm_reconciliation", "function_parameters": {"p": 2, "q": 3, "r": 1}}
    layer = ReconciledLinear.from_tinybig(config, torch.randn(12), in_features=D, out_features=N)
    assert layer.w.shape == (1, 12) and layer.bias is None
    with pytest.raises(ValueError, match=r"l = r\*\(p\+q\+s\+t\) = 1\*\(2\+3\+3\+4\) = 12; tinyBIG's w has shape \(1, 13\)"):
        ReconciledLinear.from_tinybig(config, torch.randn(1, 13), in_features=D, out_features=N)
    with pytest.raises(ValueError, match="never saved"):
        ReconciledLinear.from_tinybig({"function_class": "masking_reconciliation"}, torch.randn(1, 72),
                                      in_features=D, out_features=N)


@pytest.mark.parametrize("name", ["hm", "hypernet"])
def test_meta_layer_gets_linear_scale_when_materialized(name):
    """Deferred init (FSDP's meta device, then to_empty + reset_parameters) ends at nn.Linear's scale."""
    layer = ReconciledLinear(72, 8, tr.reconciliation(name, seed=0) if name == "hypernet" else name, device="meta")
    assert layer.w.device.type == "meta"
    layer.to_empty(device="cpu")
    torch.manual_seed(0)
    layer.reset_parameters()
    x = torch.randn(256, 72)
    ratio = layer(x).detach().std() / torch.nn.Linear(72, 8)(x).detach().std()
    assert 0.5 < ratio < 2, ratio
