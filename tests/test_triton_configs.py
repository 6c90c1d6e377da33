"""Every autotune config of every Triton kernel, not only the one the interpreter runs by default.

On a GPU ``triton.autotune`` may pick any config of a kernel's list, so each must compute the same
thing. Under the interpreter, ``kernels._common.ALL_CONFIGS`` makes launches take the configs in
turn; rounds of apply (with gradients) and build of every function with Triton kernels run until
every kernel has launched every config, each round checked against the torch reference.
"""
import functools
import importlib

import pytest
import torch

import tinyrecon as tr
from tinyrecon import dispatch, ops

from conftest import DEVICE, assert_close

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="configs in turn are an interpreter switch")

KERNEL_MODULES = sorted({dispatch.MODULES["triton"].format(family=op.family) for op in ops.OPS.values()})


def _kernels():
    """name -> every autotuned kernel (kernels._common._InTurn) of the Triton modules."""
    from tinyrecon.kernels import _common
    found = {}
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if isinstance(value, _common._InTurn):
                found[f"{module_name}.{name}"] = value
    return found


# Every function with Triton kernels, at n = 9 and D = 20 (its class's example arguments there).
FUNCTIONS = [functools.partial(cls, **cls.examples.get((9, 20), {})) for cls in tr.ALL
             if cls.op and dispatch.implementation(f"{cls.op}_apply", "triton") is not None]


def test_every_config_of_every_kernel(monkeypatch):
    from tinyrecon.kernels import _common
    kernels = _kernels()
    assert kernels
    monkeypatch.setattr(_common, "ALL_CONFIGS", True)
    for kernel in kernels.values():
        kernel.used.clear()
    n, D, batch = 9, 20, 150   # odd sizes; batch long enough for several row chunks of most tiles
    torch.manual_seed(0)
    touched = {}   # function -> the kernels its round launches
    for _ in range(max(len(k.configs) for k in kernels.values())):
        for function in FUNCTIONS:
            if function in touched and all(len(k.used) == len(k.configs) for k in touched[function]):
                continue
            rec = function()
            before = {name: k.launches for name, k in kernels.items()}
            w = torch.randn(2, rec.calculate_l(n, D), device=DEVICE)
            x, b, dy = (torch.randn(batch, D, device=DEVICE), torch.randn(n, device=DEVICE),
                        torch.randn(2, batch, n, device=DEVICE))

            def run(backend):
                leaves = [t.clone().requires_grad_() for t in (x, w, b)]
                y = rec.apply(leaves[0], leaves[1], n=n, bias=leaves[2], backend=backend)
                W = rec(n=n, D=D, w=leaves[1], backend=backend)
                return (y, W, *torch.autograd.grad((y * dy).sum() + W.sum(), leaves, allow_unused=True))

            for g, e in zip(run("triton"), run("torch")):
                assert (g is None) == (e is None) and (g is None or assert_close(g, e) is None)
            touched[function] = [k for name, k in kernels.items() if k.launches != before[name]]
    unused = {name: sorted(set(range(len(k.configs))) - k.used) for name, k in kernels.items()}
    assert not any(unused.values()), f"configs never launched: {unused}"
