"""The reconciliation functions of docs/functions.md, one module per family, all imported here; each
class registers itself by its ``number`` (``base.FUNCTIONS``), so no list is kept here."""
import importlib
import pkgutil

from ..base import FUNCTIONS

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

ALL = tuple(sorted(FUNCTIONS, key=lambda cls: cls.number))   # docs/functions.md order
globals().update({cls.__name__: cls for cls in ALL})
__all__ = [cls.__name__ for cls in ALL]
