"""tinyBIG 0.2.1's own reconciliation code, loaded without its package.

``import tinybig`` pulls in its whole dependency tree (datasets, requests, ...), which this
project must not install. The reconciliation modules need only torch, sympy and two tiny
base pieces, so this loads those source files from the installed (``pip install --no-deps
tinybig==0.2.1``) package with a minimal stand-in for its ``fabrication`` base class.
Returns None when tinyBIG is not installed.
"""
import importlib.util
import sys
import types

from torch import nn


def load():
    spec = importlib.util.find_spec("tinybig")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = spec.submodule_search_locations[0]

    class fabrication(nn.Module):   # stand-in: tinyBIG's base only stores these attributes
        def __init__(self, name="base_fabrication", require_parameters=True, enable_bias=False,
                     device="cpu", *args, **kwargs):
            super().__init__()
            self.name, self.require_parameters, self.enable_bias, self.device = (
                name, require_parameters, enable_bias, device)

    def package(name):
        mod = types.ModuleType(name)
        mod.__path__ = []
        sys.modules[name] = mod
        return mod

    saved = {k: v for k, v in sys.modules.items() if k == "tinybig" or k.startswith("tinybig.")}
    try:
        for name in ("tinybig", "tinybig.koala", "tinybig.koala.algebra"):
            package(name)
        package("tinybig.reconciliation").fabrication = fabrication

        def source(name, path):
            s = importlib.util.spec_from_file_location(name, f"{root}/{path}")
            mod = importlib.util.module_from_spec(s)
            sys.modules[name] = mod
            s.loader.exec_module(mod)
            return mod

        source("tinybig.koala.algebra.numbers", "koala/algebra/numbers.py")
        out = types.SimpleNamespace()
        for part in ("basic", "lowrank", "random_matrix", "hypernet"):
            mod = source(f"tinybig.reconciliation.{part}_reconciliation", f"reconciliation/{part}_reconciliation.py")
            for k, v in vars(mod).items():
                if k.endswith("_reconciliation"):
                    setattr(out, k, v)
        return out
    finally:
        for k in [k for k in sys.modules if k == "tinybig" or k.startswith("tinybig.")]:
            del sys.modules[k]
        sys.modules.update(saved)
