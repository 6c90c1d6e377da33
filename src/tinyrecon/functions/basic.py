"""Functions with no kernels: constant, zero, one, constant_eye, identity (docs/functions.md, 1-5).
Their apply needs no matmul (constant, eye) or is the plain GEMM with w (identity): no dispatch ops.
"""
from __future__ import annotations

import torch

from ..base import Reconciliation, add_bias


class constant_reconciliation(Reconciliation):
    """W = c * ones(n, D); l = 0."""
    number = 1
    examples = {(4, 6): dict(c=2.0)}
    repr_args = ("c",)

    def __init__(self, name="constant_c_reconciliation", c=1.0, **kwargs):
        kwargs.setdefault("require_parameters", False)
        super().__init__(name, **kwargs)
        if isinstance(c, bool) or not isinstance(c, (int, float)):
            raise TypeError(f"c must be a number, got {c!r}")
        self.c = float(c)

    def calculate_l(self, n, D):
        return 0

    def _build(self, n, D, w, backend):
        return torch.full((w.shape[0], n, D), self.c, dtype=w.dtype, device=w.device)

    def _apply_flat(self, x, w, n, bias, backend):
        # Every output is c * sum(x): one reduction, no matmul.
        y = (self.c * x.sum(-1, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))).to(x.dtype)
        return add_bias(y.expand(w.shape[0], -1, n).contiguous(), bias)   # a fresh tensor, not a stride-0 view


class zero_reconciliation(constant_reconciliation):
    """W = zeros(n, D)."""
    number, examples = 2, {}

    def __init__(self, name="zero_reconciliation", **kwargs):
        super().__init__(name, c=0.0, **kwargs)


class one_reconciliation(constant_reconciliation):
    """W = ones(n, D)."""
    number, examples = 3, {}

    def __init__(self, name="one_reconciliation", **kwargs):
        super().__init__(name, c=1.0, **kwargs)


class constant_eye_reconciliation(Reconciliation):
    """W = eye(n, D) (rectangular identity); l = 0."""
    number = 4

    def __init__(self, name="constant_eye_reconciliation", **kwargs):
        kwargs.setdefault("require_parameters", False)
        super().__init__(name, **kwargs)

    def calculate_l(self, n, D):
        return 0

    def _build(self, n, D, w, backend):
        return torch.eye(n, D, dtype=w.dtype, device=w.device).repeat(w.shape[0], 1, 1)

    def _apply_flat(self, x, w, n, bias, backend):
        # y[:, i] = x[:, i] for i < min(n, D), zero after: a copy, no matmul.
        k = min(n, x.shape[1])
        y = torch.cat([x[:, :k], x.new_zeros(x.shape[0], n - k)], dim=1)
        return add_bias(y.expand(w.shape[0], -1, -1).contiguous(), bias)


class identity_reconciliation(Reconciliation):
    """W = reshape(w, n, D); l = n*D."""
    number = 5
    degree = 1

    def __init__(self, name="identity_reconciliation", **kwargs):
        super().__init__(name, **kwargs)

    def calculate_l(self, n, D):
        return n * D

    def l_formula(self, n, D):
        return f"n*D = {n}*{D} = {n * D}"

    def _build(self, n, D, w, backend):
        return w.reshape(-1, n, D)

    def _apply_flat(self, x, w, n, bias, backend):
        return add_bias(torch.matmul(x, w.reshape(-1, n, x.shape[1]).transpose(1, 2)), bias)
