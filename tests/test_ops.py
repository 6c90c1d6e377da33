"""tinyrecon.ops: every custom op generated from a declaration has a schema, a fake (the declared
shape function) and autograd wiring that agree with the kernels behind it (torch.library.opcheck),
on every backend that runs here; the table says which ops each backend computes itself."""
import pytest
import torch

from tinyrecon import dispatch, ops, registry

from conftest import DEVICE
from test_reliability import D, N, make

FAMILIES = [f for f, cls in registry.CLASSES.items() if cls.op]   # every function with ops


def _recorded_calls(family, monkeypatch):
    """{op: its arguments} of the build and the apply of ``family`` at n=4, D=6, 2 channels (float64)."""
    calls, get = {}, dispatch.get

    def recording_get(op, device_type, backend=None):
        fn = get(op, device_type, backend)
        return lambda *args: calls.setdefault(op, args) and fn(*args)

    monkeypatch.setattr(dispatch, "get", recording_get)
    rec, f64 = make(family), dict(dtype=torch.float64, device=DEVICE)
    w = torch.randn(2, rec.calculate_l(N, D), **f64)
    rec.apply(torch.randn(3, D, **f64), w, n=N, bias=torch.randn(N, **f64), backend="torch")
    rec(N, D, w=w, backend="torch")
    return calls


def test_every_op_is_declared_once_and_the_references_are_its_torch_entries():
    # one pair per function, named after it (the Kronecker family's three share theirs)
    assert set(ops.OPS) == {f"{registry.CLASSES[f].op}_{what}" for f in FAMILIES for what in ("build", "apply")}
    for name, op in ops.OPS.items():
        assert op.impls["torch"].__name__ == name
        assert {g for g in op.grads} <= {p for p, _ in op.params}, name


GENERATED = [(f, b) for f in FAMILIES for b in dispatch.BACKENDS if b != "torch"]


@pytest.mark.parametrize("family, backend", GENERATED, ids=[f"{f}-{b}" for f, b in GENERATED])
def test_generated_ops_agree_with_their_declaration(family, backend, monkeypatch):
    calls = _recorded_calls(family, monkeypatch)
    checked = 0
    for name, args in calls.items():
        if dispatch.why_not(backend, name, torch.device(DEVICE).type):
            continue
        op = getattr(torch.ops.tinyrecon, f"{backend}_{name}", None)
        if op is None:   # registered as it is (composed of traceable ops), or the reference's
            assert dispatch.table(DEVICE)[name][backend] in ("kernel", "reference")
            continue
        args = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
        torch.library.opcheck(op.default, args)
        checked += 1
    if not checked:
        pytest.skip(f"no custom op of the {backend} backend runs {family} here")
