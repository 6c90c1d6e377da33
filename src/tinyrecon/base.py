"""What every reconciliation function shares: argument checks, channels, build/apply entry points."""
from __future__ import annotations

import functools
import math
import numbers
import operator
import threading
import weakref
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.autograd import forward_ad
from torch.nn import functional as F

from . import _random, dispatch

LAYOUTS = ("kron", "tinybig")   # the C libraries take a layout as its index here
_HALF = (torch.float16, torch.bfloat16)


def divisors(k: int) -> list[int]:
    return [d for d in range(1, k + 1) if k % d == 0]


def close_factor(k: int) -> int:
    """Largest divisor of ``k`` that is at most isqrt(k) (tinyBIG's ``find_close_factors``)."""
    return max(d for d in range(1, math.isqrt(k) + 1) if k % d == 0)


def positive_int(name: str, v, none_ok: bool = False):
    """``v`` as an int (numpy integers included) after checking it is positive; ``None`` when allowed."""
    if v is None and none_ok:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
        raise ValueError(f"{name} must be a positive int{' or None' if none_ok else ''}, got {v!r}")
    return int(v)


def check_bool(name: str, v) -> bool:
    """A flag must be a bool: a YAML string such as 'no' or 'false' would otherwise read as True."""
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {v!r} ({type(v).__name__})")
    return bool(v)


def check_dims(n, D) -> tuple[int, int]:
    return positive_int("n", n), positive_int("D", D)


def check_divides(what: str, factor: int, size_name: str, size: int) -> None:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor <= 0 or size % factor:
        raise ValueError(f"{what}={factor!r} must be a positive divisor of {size_name}={size}; "
                         f"divisors of {size}: {divisors(size)}")


def reference(fn):
    """Mark a torch reference op: fp16/bf16 inputs are computed in fp32 and rounded once at the end."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dtype = next((a.dtype for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)
                      and a.is_floating_point()), None)
        if dtype not in _HALF:
            return fn(*args, **kwargs)
        def up(a):
            return a.float() if isinstance(a, torch.Tensor) and a.dtype == dtype else a
        return fn(*map(up, args), **{k: up(v) for k, v in kwargs.items()}).to(dtype)
    return wrapper


def torch_passes(x, Ar, Br, want_u: bool, want_v: bool):
    """``(U, V)`` with ``U[b] = Ar @ X[b]`` (N, rA, t) and ``V = Br @ x.reshape(N*q, t)^T`` (rB, N*q),
    each only when wanted (else None): every read of x a structured apply makes (two GEMMs here; the
    CPU backend's one pass reads x once for both)."""
    N, q, t = x.shape
    x = x.to(Br.dtype)   # a bfloat16 x that the CPU kernels read as is
    U = torch.bmm(Ar.expand(N, Ar.shape[0], q), x) if want_u else None
    V = torch.mm(Br, x.reshape(N * q, t).T) if want_v else None
    return U, V


def torch_expand(G, Ar):
    """``dX[b] = Ar^T @ G[b]`` for G (N, rA, t): (N, q, t), the one write of dx."""
    return torch.bmm(Ar.T.expand(G.shape[0], Ar.shape[1], Ar.shape[0]), G)


class XOps(NamedTuple):
    """The two parts of a structured apply that touch x (a backend may replace both)."""
    passes: Callable   # (x, Ar, Br, want_u, want_v) -> (U or None, V or None), as torch_passes
    expand: Callable   # (G, Ar) -> dx, as torch_expand


TORCH_X_OPS = XOps(torch_passes, torch_expand)


def traceable(x_ops: XOps) -> XOps:
    """``x_ops``, or torch's own under torch.func transforms (a backend's kernels read raw memory,
    which a vmapped or grad-tracked tensor does not have)."""
    return TORCH_X_OPS if torch._C._are_functorch_transforms_active() else x_ops


class _FactorPass(torch.autograd.Function):
    """``Z[b] = f @ X[b]^T`` for a big ``x`` (B, M, K) and a factor ``f`` (R, K): the one pass over x
    of the low-rank and block-diagonal applies, on x folded to (B*M, K) and on the right (at the MNIST
    layer, R = 5: 2x faster than ``x @ f.T`` with MKL on the Xeon VM). The backward makes one more pass
    for ``df`` and writes ``dx`` once, all three ``x_ops``. A double backward and torch.func run the
    backward in torch's ops, which autograd records."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x, f, x_ops):
        B, M, K = x.shape
        _, Z = traceable(x_ops).passes(x.reshape(1, B * M, K), f.new_empty(0, B * M), f, False, True)   # (R, B*M)
        return Z.view(f.shape[0], B, M).transpose(0, 1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, f, x_ops = inputs
        ctx.save_for_backward(x, f)
        ctx.x_ops = x_ops

    @staticmethod
    def backward(ctx, dz):
        x, f = ctx.saved_tensors
        B, M, K = x.shape
        x_ops = TORCH_X_OPS if torch.is_grad_enabled() else traceable(ctx.x_ops)
        dz2 = dz.transpose(0, 1).reshape(f.shape[0], B * M)    # (R, B*M), small
        dx = df = None
        if ctx.needs_input_grad[0]:
            dx = x_ops.expand(f[None], dz2).view(B, M, K)
        if ctx.needs_input_grad[1]:
            df = x_ops.passes(x.reshape(1, B * M, K), dz2, f.new_empty(0, K), True, False)[0][0]
        return dx, df, None


def factor_pass(x: torch.Tensor, f: torch.Tensor, x_ops: XOps = TORCH_X_OPS) -> torch.Tensor:
    """``f @ X[b]^T`` for each ``X[b]`` of ``x`` (B, M, K), with f (R, K): ``(B, R, M)``."""
    return _FactorPass.apply(x, f, x_ops)


def channel_matmul(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A @ B`` for ``(C, m, k) @ (C, k, n)`` as one 2-D matmul per channel: the bits of tinyBIG's
    (a batched matmul rounds differently with MKL on AVX-512), which ``layout="tinybig"`` promises."""
    if len(A) == 1:   # the usual one channel: the same matmul without splitting and stacking
        return (A[0] @ B[0])[None]
    return torch.stack([a @ b for a, b in zip(A, B)]) if len(A) else torch.matmul(A, B)


def add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias


def bias_grad(dy: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The bias's gradient from ``dy`` (C, N, n): summed in fp32 (fp64 for fp64), rounded once."""
    return dy.sum((0, 1), dtype=torch.float64 if dy.dtype == torch.float64 else torch.float32).to(bias.dtype)


FUNCTIONS: list = []   # every class with a ``number``, registered when its module is imported


class Reconciliation(nn.Module):
    """Base of all reconciliation functions: ``W = psi(w)`` of shape ``(n, D)``.

    ``w`` may be ``(l,)``, ``(1, l)`` (tinyBIG's shape) or ``(C, l)`` for ``C`` channels, a dimension
    results keep only when ``C > 1``. Subclasses define ``calculate_l`` (and ``l_formula``) and either
    ``op`` and ``_op_args`` or ``_build`` -> ``(C, n, D)`` and ``_apply_flat`` -> ``(C, N, n)``.
    """

    # Its number in docs/functions.md (orders ``tinyrecon.ALL``); a class with one registers in ``FUNCTIONS``.
    number: int | None = None
    # Prefix of this function's dispatch ops, "<op>_build" and "<op>_apply" (None: it has none).
    op: str | None = None
    # Whether ``apply`` builds W and makes one F.linear when W is small (``BUILD_BELOW``).
    build_when_small: bool = False
    # Working constructor arguments for the tests and the benchmark: ``examples`` maps (n, D) to them
    # (other sizes take the defaults; the tests use (4, 6) and, with kernels, (9, 20)).
    examples: dict = {}
    bench_args: dict = {}
    # psi(c * w) = c**degree * psi(w), for init="linear"'s scaling; None: no such degree (sigmoid, l = 0).
    degree: int | None = None
    # The attributes repr shows after ``name`` (the constructor's arguments of the same names).
    repr_args: tuple = ()
    # Whether W depends on w alone (no draw per call), so a no-grad small-W call may reuse it.
    w_alone_sets_W: bool = True
    _arguments = property(lambda self: ())

    def __init__(self, name: str, *, require_parameters: bool = True, enable_bias: bool = False,
                 device=None, backend: str | None = None):
        super().__init__()
        self.name = name
        # Accepted for tinyBIG config compatibility; the layer owning w and bias uses them.
        self.require_parameters = check_bool("require_parameters", require_parameters)
        self.enable_bias = check_bool("enable_bias", enable_bias)
        self.device = device
        if backend is not None:
            dispatch.check_name(backend)
        self.backend = backend

    def __init_subclass__(cls, **kwargs):
        if cls.repr_args:   # its arguments' values, in one attribute lookup (``_small_key``)
            cls._arguments = property(operator.attrgetter(*cls.repr_args))
        # Every calculate_l checks n and D as forward and apply do (hypernets' may be omitted).
        super().__init_subclass__(**kwargs)
        if "number" in cls.__dict__:
            FUNCTIONS.append(cls)
        own = cls.__dict__.get("calculate_l")
        if own is not None:
            @functools.wraps(own)
            def calculate_l(self, n=None, D=None):
                if n is not None or D is not None:
                    n, D = check_dims(n, D)
                return int(own(self, n, D))
            cls.calculate_l = calculate_l

    # ---- what subclasses provide -------------------------------------------------
    def calculate_l(self, n: int, D: int) -> int:
        raise NotImplementedError

    def l_formula(self, n: int, D: int) -> str:
        """How ``l`` is computed, with the numbers filled in (for error messages)."""
        return str(self.calculate_l(n, D))

    def setup(self, n: int, D: int) -> None:
        """Create any trainable state that depends on (n, D); called by layers at construction."""

    def _op_args(self, n: int, D: int, w: torch.Tensor) -> tuple:
        """Its ops' arguments other than x, bias, layout and D (``_run_op`` adds those), from w (C, l)."""
        raise NotImplementedError

    def _build(self, n, D, w, backend):
        self.check_draws(n, D, w)
        return self._run_op("build", w, backend, self._op_args(n, D, w), D=D)

    def _apply_flat(self, x, w, n, bias, backend):
        if self.op is None:
            return self._dense_apply(x, w, n, bias, backend)
        self.check_draws(n, x.shape[-1], x)
        return self._run_op("apply", x, backend, self._op_args(n, x.shape[-1], w), x=x, bias=bias)

    def _dense_apply(self, x, w, n, bias, backend):
        # Functions without exploitable structure: build W once and use one GEMM.
        W = self._build(n, x.shape[-1], w, backend)
        return add_bias(torch.matmul(x, W.transpose(1, 2)), bias)

    def check_draws(self, n: int, D: int, like: torch.Tensor) -> None:
        """Refuse a call drawing too many random numbers (``Seeded``), before ``_op_args`` uses a mask seed."""

    # ---- public API --------------------------------------------------------------
    def forward(self, n: int, D: int, w: torch.Tensor | None = None, device=None, backend=None,
                *args, **kwargs) -> torch.Tensor:
        """Build ``W = psi(w)``: ``(n, D)``, or ``(C, n, D)`` for ``C > 1`` channels; under
        ``torch.autocast`` in the autocast dtype (w is cast as F.linear casts its weight)."""
        n, D = check_dims(n, D)
        device_type = w.device.type if isinstance(w, torch.Tensor) else torch.device(device or "cpu").type
        dtype = _autocast_dtype(device_type)
        if dtype is not None:   # as F.linear does: cast, then run with autocast off
            if w is None and not self.calculate_l(n, D):
                w = torch.empty(0, dtype=dtype, device=device)
            with torch.autocast(device_type, enabled=False):
                return self.forward(n, D, _cast(w, dtype), device, backend)
        w2, keep = self._channels(w, n, D, like=None)
        W = self._build(n, D, w2, self._backend(backend))
        W = W if keep else W[0]
        return W if device is None else W.to(device)

    def apply(self, x: torch.Tensor, w: torch.Tensor | None = None, n: int | None = None,
              bias: torch.Tensor | None = None, backend: str | None = None, D: int | None = None) -> torch.Tensor:
        """``x @ psi(w)^T + bias`` without building W where the function has structure.

        ``x``: ``(*batch, D)``; ``D`` is read from x, or checked against x when given.
        Returns ``(*batch, n)``, or ``(C, *batch, n)`` for ``C > 1`` channels.
        Under ``torch.autocast`` it follows F.linear: floating-point x, w and bias are cast to the
        autocast dtype of x's device type and the op runs in that dtype with autocast off.
        """
        key = self._small_key(x, w, n, bias, backend, D)
        if key is not None:
            state, reuse = _small_state(self), self.w_alone_sets_W and _reuses_w(w)
            kept = state[1].get(key) if reuse else None   # (w's values, W, inference mode), immutable
            if kept is not None and kept[2] == torch.is_inference_mode_enabled() and torch.equal(kept[0], w):
                return F.linear(x, kept[1], bias)   # kept by a call with the same key: checked
            fused = state[0].get(key, _UNCHECKED)
            if fused is not _UNCHECKED:   # checked before: straight to the small-W path
                return self._small_linear(x, w, n, bias, backend or self.backend, key, state, reuse, fused)
        if callable(x) and not isinstance(x, torch.Tensor) and w is None and n is None:
            # nn.Module.apply(fn) (e.g. ``model.apply(init_weights)``) recurses into children,
            # this one included: keep that working.
            return super().apply(x)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.dim() == 0:
            raise ValueError("x must have at least one dimension (its last is D)")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        dtype = _autocast_dtype(x.device.type)
        if dtype is not None:   # as F.linear does: cast, then run with autocast off
            with torch.autocast(x.device.type, enabled=False):
                return self.apply(_cast(x, dtype), _cast(w, dtype), n, _cast(bias, dtype), backend, D)
        if D is not None and x.shape[-1] != D:
            raise ValueError(f"x's last dimension is {x.shape[-1]} but D={D}")
        D = x.shape[-1]
        if n is None:
            raise ValueError("apply needs the output width n")
        n, D = check_dims(n, D)
        w2, keep = self._channels(w, n, D, like=x)
        if bias is not None:
            if not isinstance(bias, torch.Tensor):
                raise TypeError(f"bias must be a tensor of shape ({n},) or None, got {type(bias).__name__}")
            _same(bias, x, "bias", "x")
            if tuple(bias.shape) != (n,):
                raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        batch = x.shape[:-1]
        backend = self._backend(backend)
        if self.build_when_small and n * D < BUILD_BELOW and _builds_small(self.op, x, backend):
            if not keep:   # one channel: F.linear takes x's batch dimensions as they are
                if key is None:
                    return F.linear(x, self._build(n, D, w2, backend).squeeze(0), bias)
                make = dispatch.small_linear(f"{self.op}_build", x.device.type, backend)
                fused = make(self, n, D, w) if make else None
                with _SMALL_LOCK:   # every check above passed: later calls with this key skip them
                    if len(state[0]) >= _SMALL_KEYS:
                        state[0].clear()
                    state[0][key] = fused
                return self._small_linear(x, w, n, bias, backend, key, state, reuse, fused)
            y = self._dense_apply(x.reshape(-1, D), w2, n, bias, backend)
        else:
            y = self._apply_flat(x.reshape(-1, D), w2, n, bias, backend)
        y = y.reshape(y.shape[0], *batch, n)
        return y if keep else y[0]

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={getattr(self, k)!r}" for k in ("name", *self.repr_args))

    # ---- helpers -----------------------------------------------------------------
    def _small_key(self, x, w, n, bias, backend, D):
        """What ``apply``'s checks and its choice of the small-W path depend on, for a call on CPU
        tensors that can take that path; None where the checks run every time (anything but plain
        CPU tensors and an int n, autocast, tracing, torch.func, a dispatch mode such as
        FakeTensorMode: a kept W must not enter a graph as a constant). Everything checked is in it:
        the dtypes and shapes (x's width, not its batch), n and D, the backend asked for (the first
        given of ``dispatch.requested``'s sources: the argument, the instance's, the block's, the
        environment's), the function's own arguments (``repr_args``) and ``BUILD_BELOW``."""
        if (not self.build_when_small or type(x) is not torch.Tensor or type(w) is not torch.Tensor
                or type(n) is not int or not (D is None or type(D) is int) or not x.is_cpu or not w.is_cpu
                or not (backend is None or type(backend) is str)
                or not (self.backend is None or type(self.backend) is str)
                or torch._C._is_any_autocast_enabled() or torch.jit.is_tracing() or not dispatch.eager()):
            return None
        if bias is None:
            b = None
        elif type(bias) is torch.Tensor and bias.is_cpu:
            b = (bias.dtype, bias.shape)
        else:
            return None
        choice = backend or self.backend or dispatch._local.backend or dispatch.env_backend()
        return x.dtype, x.shape[-1:], w.dtype, w.shape, n, D, b, choice, self._arguments, BUILD_BELOW

    def _small_linear(self, x, w, n, bias, backend, key, state, reuse: bool, fused):
        """The small-W path of a checked one-channel call: ``F.linear(x, W, bias)`` with W from the
        backend's build, kept for later calls with the same w values when ``reuse``; else the backend's
        fused apply where it has one (``fused``, from ``dispatch.small_linear``; not under forward-mode AD)."""
        if not reuse and fused is not None and forward_ad._current_level < 0 and w.is_contiguous():
            return fused(x, w, bias)
        if reuse:   # built from the copy it is kept with: the pair agrees even if w is written meanwhile
            w = w.detach().clone()
        W = self._build(n, x.shape[-1], w.reshape(1, w.shape[-1]), backend).squeeze(0)
        if reuse:
            with _SMALL_LOCK:
                if len(state[1]) >= _SMALL_W_KEYS and key not in state[1]:
                    state[1].clear()
                state[1][key] = (w, W, torch.is_inference_mode_enabled())
        return F.linear(x, W, bias)

    def _op_call(self, what: str, args: tuple, **named) -> list:
        """The arguments of this function's op ``<op>_<what>``: ``args``, and ``named`` (x, bias, D, and
        the function's layout) each where the op declares it."""
        args, named = iter(args), {"layout": getattr(self, "layout", None), **named}
        return [named[p] if p in named else next(args) for p, _ in ops.OPS[f"{self.op}_{what}"].params]

    def _run_op(self, what: str, like: torch.Tensor, backend, args: tuple, **named):
        """This function's op ``<op>_<what>`` on the backend for tensors like ``like``."""
        op = f"{self.op}_{what}"
        return dispatch.get(op, like.device.type, backend)(*self._op_call(what, args, **named))

    def _backend(self, backend):
        # Checked here, not only in dispatch: functions without ops (identity, constant, eye)
        # would otherwise ignore a misspelt name.
        backend = backend or self.backend
        dispatch.check_name(dispatch.requested(backend))
        return backend

    def _channels(self, w, n, D, like):
        """Check ``w`` against ``l`` and return it as ``(C, l)`` plus whether to keep C."""
        l = self.calculate_l(n, D)
        if w is None:
            if l:
                raise ValueError(f"{type(self).__name__} needs w with l = {self.l_formula(n, D)} entries")
            dtype = like.dtype if like is not None else torch.get_default_dtype()
            device = like.device if like is not None else None
            return torch.empty(1, 0, dtype=dtype, device=device), False
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"w must be a tensor, got {type(w).__name__}")
        if not w.is_floating_point():
            raise TypeError(f"w must be a floating-point tensor (float64/32/16 or bfloat16), got {w.dtype}")
        if w.dim() not in (1, 2) or w.shape[-1] != l:
            raise ValueError(f"{type(self).__name__} with n={n}, D={D} expects w of shape (l,), (1, l) "
                             f"or (C, l) with l = {self.l_formula(n, D)}; got {tuple(w.shape)}")
        if like is not None:
            _same(w, like, "w", "x")
        if w.dim() == 2 and w.shape[0] == 0:
            raise ValueError(f"w has 0 channels (shape {tuple(w.shape)}); give at least one row of l = {l}")
        w2 = w.reshape(1, l) if w.dim() == 1 else w
        return w2, w.dim() == 2 and w.shape[0] > 1


# Below this many entries of W (n*D), ``apply`` of a function with ``build_when_small`` builds W
# with the backend's build and makes one F.linear, where the torch and cpu backends run the apply:
# a structured apply's extra ops cost more than the GEMM with W there. Measured on the 2-core VM
# (bench/small_w_sweep.py, bench/results/cpu-2core-2026-12-01-tiny): the build is 1.3-2.9x faster
# fwd up to n*D = 16384 and slower for some functions at 65536; 4096 keeps a margin (train gains
# less: 0.9-3x, noisy). Tests set it to 0 to reach the structured applies.
BUILD_BELOW = 4096


# Without gradients to W, the small-W path reuses the W it built last for the same w values: W
# depends only on them and the function's arguments. Compared by value (``torch.equal`` with a copy
# of w), as a write through ``w.data`` changes no version counter. CPU tensors only (comparing
# a GPU tensor's values would wait for the device); off under tracing and torch.func. Per instance
# at most _SMALL_W_KEYS entries, each a copy of w and one W, both below BUILD_BELOW entries; and at
# most _SMALL_KEYS keys of checked calls. Reads are single dict lookups of immutable entries;
# writes hold the lock.
CACHE_SMALL_W = True
_UNCHECKED = object()
_SMALL_KEYS, _SMALL_W_KEYS = 64, 8
_SMALL_LOCK = threading.Lock()
_SMALL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # instance -> (checked keys, kept Ws)


def _reuses_w(w: torch.Tensor) -> bool:
    """Whether a call with a ``_small_key`` (nothing tracing or transforming it) may take W from the
    cache: w is small too (its copy is kept) and no gradient reaches W."""
    return CACHE_SMALL_W and w.numel() < BUILD_BELOW and not (w.requires_grad and torch.is_grad_enabled())


def _small_state(rec) -> tuple[dict, dict]:
    """``rec``'s checked call keys and kept (w copy, W) pairs of the small-W path."""
    state = _SMALL.get(rec)
    if state is None:
        with _SMALL_LOCK:
            state = _SMALL.setdefault(rec, ({}, {}))
    return state


def _builds_small(op: str, x: torch.Tensor, backend) -> bool:
    """Whether the apply of ``op`` on ``x`` runs on a backend whose small applies are a build and
    F.linear (torch, cpu); Triton and CUDA keep their own ops (their first-order refusals included)."""
    return dispatch.resolve(f"{op}_apply", x.device.type, backend) in ("torch", "cpu")


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` casts F.linear's inputs to on this device type, or None when off."""
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return None
    return torch.get_autocast_dtype(device_type)


def _cast(t, dtype: torch.dtype):
    """``t`` in ``dtype`` when it is a floating-point tensor; anything else is left for the checks to name."""
    return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _same(a: torch.Tensor, b: torch.Tensor, an: str, bn: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{an} is on {a.device} but {bn} is on {b.device}; move both to one device")
    if a.dtype != b.dtype:
        raise TypeError(f"{an} has dtype {a.dtype} but {bn} has dtype {b.dtype}; use one dtype")


class Seeded:
    """Mixin: frozen random matrices regenerated from ``seed`` (``state_dict``'s extra state), never stored."""

    def _init_seed(self, seed):
        self.seed = _random.new_seed() if seed is None else check_seed(seed)

    def stream_seed(self, stream: int) -> int:
        return _random.derive_seed(self.seed, stream)

    def random_count(self, n: int, D: int) -> int:
        """How many random numbers one build or apply at (n, D) draws."""
        raise NotImplementedError

    def check_draws(self, n: int, D: int, like: torch.Tensor) -> None:
        """``_random.check_cost`` before dispatch, so the limit holds on every backend (meta draws nothing)."""
        if like.device.type != "meta":
            _random.check_cost(self.random_count(n, D), f"{type(self).__name__} at n={n}, D={D}")

    def get_extra_state(self):
        return {"seed": self.seed}

    def set_extra_state(self, state):
        self.seed = check_seed(_saved(state, "seed"), "the state_dict's seed")


def check_seed(seed, name: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2 ** _random.SEED_BITS:
        raise ValueError(f"{name} must be an int in [0, 2**{_random.SEED_BITS}), got {seed!r}")
    return int(seed)


def _saved(state, key: str):
    """``state[key]`` of a loaded extra state, or an error saying what the checkpoint lacks."""
    if not isinstance(state, dict) or key not in state:
        raise ValueError(f"the state_dict's extra state of this function must be a dict with {key!r}, got {state!r}; "
                         "was it saved from the same function?")
    return state[key]


from . import ops  # noqa: E402  (ops builds on this module, so it is imported last)
