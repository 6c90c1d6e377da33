"""What a case times (the candidate and its baselines, on the same inputs) and the check of the
candidate's result against the float64 torch reference."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..tolerances import TOL
from .cases import SHAPES, Case, Shape, make_function


def _thunks(rec, shape: Shape, op: str, x, w, bias, g, backend: str, baselines: bool):
    """Callables for the candidate (``backend``), tinyBIG's algorithm and (``baselines``) nn.Linear and ``x.sum()``."""
    n, D = shape.n, shape.D

    def tinybig():
        return F.linear(x, rec(n=n, D=D, w=w, backend="torch"), bias)

    def apply():
        return rec.apply(x, w, n=n, bias=bias, backend=backend)

    if op == "build":
        return {"candidate": lambda: rec(n=n, D=D, w=w, backend=backend),
                "tinybig": lambda: rec(n=n, D=D, w=w, backend="torch")}
    lin = torch.nn.Linear(D, n, device=x.device, dtype=x.dtype) if baselines else None
    floor = {"floor": torch.no_grad()(lambda: x.sum())} if baselines else {}
    if op == "fwd":
        fns = {"candidate": apply, "tinybig": tinybig} | ({"dense": lambda: lin(x)} if lin else {})
        return {name: torch.no_grad()(f) for name, f in fns.items()} | floor
    wrt = (x, w, bias) if op == "fwdbwd" else (w, bias)
    fns = {"candidate": _with_grads(apply, wrt, g), "tinybig": _with_grads(tinybig, wrt, g)}
    if lin:
        fns["dense"] = _with_grads(lambda: lin(x), (x, lin.weight, lin.bias)[3 - len(wrt):], g)
    return fns | floor


def _with_grads(forward, inputs, g):
    def run():
        y = forward()
        return (y.detach(), *step_grads(y, inputs, g))
    return run


def step_grads(y, inputs, g):
    """The gradients of ``inputs`` for the scalar loss ``(y * g).sum()`` (dloss/dy = g), as a training
    step's ``loss.backward()`` takes them: torch's first ``autograd.grad`` given a gradient tensor
    imports sympy (~0.5 s, any model), which a step on a scalar loss never pays."""
    return torch.autograd.grad((y * g).sum(), inputs, materialize_grads=True)


def prepare(case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """``(fns, reference)``: the timed callables, and one computing the candidate's float64 reference (tinyBIG's)."""
    shape = SHAPES[case.shape]
    rec = make_function(case.function)
    gen = torch.Generator().manual_seed(seed)
    grad = case.op in ("fwdbwd", "train")

    def tensor(*size, grad=grad):
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype).requires_grad_(grad)

    w = tensor(rec.calculate_l(shape.n, shape.D))
    x = tensor(shape.batch, shape.D, grad=case.op == "fwdbwd") if case.op != "build" else None
    bias = tensor(shape.n) if case.op != "build" else None
    g = torch.randn(shape.batch, shape.n, generator=gen).to(device=device, dtype=dtype)
    fns = _thunks(rec, shape, case.op, x, w, bias, g, case.backend, baselines=True)

    def reference():
        x64, w64, b64 = (None if t is None else t.detach().double().requires_grad_(t.requires_grad)
                         for t in (x, w, bias))
        return _thunks(rec, shape, case.op, x64, w64, b64, g.double(), "torch", baselines=False)["tinybig"]()
    return fns, reference


def finite(v: float) -> float | None:
    """``v``, or None for inf (a wrong shape or NaN), which JSON cannot hold."""
    return v if math.isfinite(v) else None


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def tolerance_used(actual, expected, dtype: torch.dtype) -> float:
    """Largest |actual - expected| as a fraction of the dtype's tolerance (> 1: wrong; inf: shape or NaN)."""
    tol = TOL[dtype]
    actual, expected = _as_tuple(actual), _as_tuple(expected)
    if len(actual) != len(expected):
        return math.inf
    worst = 0.0
    for a, e in zip(actual, expected):
        if tuple(a.shape) != tuple(e.shape):
            return math.inf
        if not e.numel():
            continue
        scale = max(1.0, e.abs().max().item())
        ratio = (a.double() - e).abs() / (tol["atol"] * scale + tol["rtol"] * e.abs())
        worst = max(worst, torch.nan_to_num(ratio, nan=math.inf).max().item())
    return worst
