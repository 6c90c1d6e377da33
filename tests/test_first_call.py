"""An eager first call imports nothing a tracer needs: torch._dynamo costs seconds to import, more
than the call itself (the custom ops are reached only under tracing)."""
import subprocess
import sys

import pytest
import torch

CODE = """
import sys, torch, tinyrecon as tr
assert "torch._dynamo" not in sys.modules, "imported by tinyrecon itself"
rec = tr.reconciliation(sys.argv[1], **eval(sys.argv[2]))
x = torch.randn(3, 4096)
w = torch.randn(rec.calculate_l(8, 4096), requires_grad=True)
rec(8, 4096, w=w)
rec.apply(x, w, n=8).sum().backward()
print("torch._dynamo" in sys.modules)
"""


# One function of each kind of CPU apply: the references with the library's passes over x, and the
# generated ops (tinyrecon.ops) of masking and the hypernets, forward and backward.
@pytest.mark.parametrize("family, kwargs", [("random_matrix_adaption", "dict(r=2, seed=1)"), ("lorr", "dict(r=2)"),
                                            ("dual_lphm", "dict(r=2)"), ("duplicated_padding", "dict(p=2)"),
                                            ("masking", "dict(seed=1)"), ("hypernet", "dict(l=4, hidden_dim=3, seed=1)"),
                                            ("random_matrix_hypernet", "dict(r=2, l=4, hidden_dim=3, seed=1)")])
def test_eager_first_call_does_not_import_dynamo(family, kwargs):
    out = subprocess.run([sys.executable, "-c", CODE, family, kwargs], capture_output=True, text=True,
                         env={k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("function", ["lorr", "random_matrix_adaption"])
def test_benchmark_train_step_imports_no_sympy_and_takes_the_loss_gradients(function):
    """The benchmark's train op (warm and first calls alike, ``check.prepare``) is a step on a scalar
    loss: its first call imports neither torch.fx's symbolic shapes (sympy), which torch's autograd
    imports when given a gradient tensor, nor torch._dynamo; and its gradients are those of y
    with the gradient g."""
    from tinyrecon.benchmark import cases, check, timing
    case = cases.Case(function, "small", "train", "cpu")
    r = timing.first_call(case, torch.float32, torch.device("cpu"), "candidate", warm=1)
    assert not {"sympy", "torch.fx.experimental.symbolic_shapes", "torch._dynamo"} & set(r["imported"])
    assert r["first_s"] > 0 and r["warm_s"] > 0
    y = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(3, requires_grad=True)
    g = torch.randn(4, 3)
    assert all(torch.equal(a, b) for a, b in zip(check.step_grads(y * w, (y, w), g),
                                                 torch.autograd.grad(y * w, (y, w), g)))
