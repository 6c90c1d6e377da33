"""Look functions up by short name (``"dual_lphm"``) or tinyBIG class path."""
from __future__ import annotations

from .base import Reconciliation
from .functions import ALL

SUFFIX = "_reconciliation"
CLASSES = {cls.__name__[: -len(SUFFIX)]: cls for cls in ALL}
# tinyBIG spells the low-rank one "lorr" but also documents "low_rank"; RMA has a short form.
ALIASES = {"low_rank": "lorr", "rma": "random_matrix_adaption", "rmh": "random_matrix_hypernet",
           "constant_c": "constant", "identical": "identity"}


def lookup(name: str) -> type[Reconciliation]:
    """Class for ``"dual_lphm"``, ``"dual_lphm_reconciliation"`` or
    ``"tinybig.reconciliation.dual_lphm_reconciliation"`` (any module path)."""
    if not isinstance(name, str):
        raise TypeError(f"a reconciliation name must be a str, got {type(name).__name__}")
    short = name.rsplit(".", 1)[-1]
    if short.endswith(SUFFIX):
        short = short[: -len(SUFFIX)]
    short = ALIASES.get(short, short)
    if short not in CLASSES:
        raise ValueError(f"unknown reconciliation {name!r}; known: {sorted(CLASSES)} "
                         f"(also as '<name>{SUFFIX}' or 'tinybig.reconciliation.<name>{SUFFIX}')")
    return CLASSES[short]


def reconciliation(name: str, *args, **kwargs) -> Reconciliation:
    """``tr.reconciliation("dual_lphm", p=8, q=784, r=5)``: construct a function by name."""
    return lookup(name)(*args, **kwargs)
