"""tinyrecon: parameter reconciliation (tinyBIG's RPN ``psi``) without building W.

    import tinyrecon as tr
    rec = tr.dual_lphm_reconciliation(p=8, q=784, r=5)
    W = rec(w=w, n=64, D=615440)          # build W, like tinyBIG
    y = rec.apply(x, w, n=64, bias=b)     # x @ W^T + b without building W
"""
from ._random import cache_info, clear_cache, set_cache_budget
from .base import Reconciliation
from .config import from_config
from .dispatch import BackendUnavailable, use_backend
from .functions import *  # noqa: F401,F403  (the 15 tinyBIG class names)
from .functions import ALL
from .registry import lookup, reconciliation
from .nn import ReconciledLinear

from . import dispatch as _dispatch

_dispatch.preload()

__version__ = "0.1.0"
__all__ = ["Reconciliation", "BackendUnavailable", "use_backend", "lookup", "reconciliation",
           "from_config", "ReconciledLinear", "cache_info", "clear_cache", "set_cache_budget",
           *[cls.__name__ for cls in ALL]]
