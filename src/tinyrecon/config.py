"""Build reconciliation functions from tinyBIG's config dicts and YAML/JSON files, unchanged.

Accepted forms (tinyBIG 0.2.1 spells the same thing three ways)::

    {'parameter_reconciliation_class': 'tinybig.reconciliation.dual_lphm_reconciliation',
     'parameter_reconciliation_parameters': {'p': 2, 'q': 3, 'r': 1}}
    {'parameter_fabrication_class': ..., 'parameter_fabrication_parameters': {...}}   # head configs
    {'function_class': ..., 'function_parameters': {...}}                             # function_configs

or any of these wrapped in one of ``WRAPPERS``. tinyBIG's extra keys (``name``, ``require_parameters``,
``enable_bias``, ``device``) are accepted. A ``layout`` key, next to the class or among the parameters,
selects tinyBIG 0.2.1's matrices (``'tinybig'``) or the documented math (``'kron'``, the default).
"""
from __future__ import annotations

import inspect
import os

import yaml

from .base import LAYOUTS, Reconciliation, Seeded
from .registry import lookup, reconciliation

PREFIXES = ("parameter_reconciliation", "parameter_fabrication", "function")
WRAPPERS = ("parameter_reconciliation_configs", "parameter_fabrication_configs", "head_parameters")


def load(path) -> dict:
    """The dict in a YAML (or JSON, a subset of YAML) file."""
    with open(path) as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(config).__name__}")
    return config


def from_config(config, **overrides) -> Reconciliation:
    """The reconciliation function a tinyBIG config dict, or a YAML/JSON file path, describes;
    ``overrides`` replace its parameters (e.g. ``layout="tinybig"``, ``backend="torch"``)."""
    if isinstance(config, (str, os.PathLike)):
        config = load(config)
    if not isinstance(config, dict):
        raise TypeError(f"a config must be a dict or a file path, got {type(config).__name__}")
    for prefix in PREFIXES:
        if f"{prefix}_class" in config:
            params = config.get(f"{prefix}_parameters") or {}
            if not isinstance(params, dict):
                raise TypeError(f"{prefix}_parameters must be a mapping, got {type(params).__name__}")
            params = dict(params)
            if "layout" in config:
                params.setdefault("layout", config["layout"])
            return _construct(config[f"{prefix}_class"], {**params, **overrides})
    for key in WRAPPERS:
        if isinstance(config.get(key), dict):
            return from_config(config[key], **overrides)
    raise ValueError(f"no reconciliation config found; expected a '<prefix>_class' key with prefix in "
                     f"{list(PREFIXES)}, or one of {list(WRAPPERS)}; got keys {sorted(config)}")


def _construct(class_name: str, params: dict) -> Reconciliation:
    cls = lookup(class_name)
    layout = params.get("layout", "kron")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    accepted = inspect.signature(cls).parameters
    if "layout" not in accepted:
        if layout == "tinybig" and issubclass(cls, Seeded):
            raise ValueError(f"layout='tinybig' cannot reproduce tinyBIG 0.2.1's {cls.__name__}: its frozen "
                             "random matrices came from torch's global generator and were never saved")
        params.pop("layout", None)   # this function computes the same W in both layouts
    try:
        return cls(**params)
    except TypeError as e:
        if "keyword argument" not in str(e):   # a parameter of the wrong type: its own message says which
            raise
        names = [k for k, p in accepted.items() if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD]
        raise TypeError(f"{cls.__name__}: {e}; its parameters: {names} and "
                        "require_parameters, enable_bias, device, backend") from e


def resolve(spec) -> Reconciliation:
    """A function given as an instance, a short name (``"dual_lphm"``) or a config dict / path."""
    if isinstance(spec, Reconciliation):
        return spec
    if isinstance(spec, str) and not spec.endswith((".yaml", ".yml", ".json")):
        return reconciliation(spec)
    return from_config(spec)
