"""The one dispatch table: which backend runs an op, and why another cannot.

``backend="auto"`` (the default) takes the first backend of the device's list that can run the op;
a user picks one per call (``backend=``), per block (``with tr.use_backend("triton"):``) or per
process (``TINYRECON_BACKEND``), in that order of precedence. One that cannot run raises
:class:`BackendUnavailable` saying why.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import threading

import torch
from torch.utils import _python_dispatch

BACKENDS = ("torch", "triton", "cuda", "cpu")

# device type -> backends "auto" tries, best first; AUTO_CUDA_OPS: ops the CUDA library runs first on a GPU.
AUTO = {
    "cuda": ("triton", "torch"),
    "cpu": ("cpu", "torch"),
    "mps": ("torch",),
}
AUTO_CUDA_OPS: frozenset = frozenset()

# Where each backend registers its implementations (``ops.implement``); a module may also offer a
# fused small-W apply (``small_linear``, below).
MODULES = {"torch": "tinyrecon.functions.{family}", "triton": "tinyrecon.kernels.{family}",
           "cuda": "tinyrecon.cuda_ops", "cpu": "tinyrecon.cpu_ops"}
# backend -> what runs the ops it has no kernel for (the CPU library's builds read no x); others refuse.
FALLBACK = {"cpu": "torch"}


def eager(*tensors: torch.Tensor) -> bool:
    """Whether an op can run as plain Python on these tensors: real tensors, nothing tracing or
    transforming them. (Called eagerly, a custom op costs a dispatch, and its first call imports
    torch._dynamo: seconds.)"""
    return (not torch.compiler.is_compiling() and _python_dispatch._get_current_dispatch_mode() is None
            and not torch._C._are_functorch_transforms_active() and all(type(t) is torch.Tensor for t in tensors))


def traced_op(name: str, fn, fake):
    """``fn`` on eager calls, the custom op ``tinyrecon::<name>`` (``.op``; ``fake`` gives its outputs'
    shapes) on traced or transformed ones, so torch.compile sees one opaque op. ``fn`` has type hints."""
    op = torch.library.custom_op(f"tinyrecon::{name}", fn, mutates_args=())
    op.register_fake(fake)

    @functools.wraps(fn)
    def call(*args):
        return (fn if eager(*(a for a in args if isinstance(a, torch.Tensor))) else op)(*args)
    call.op = op
    return call


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run this op on these tensors; the message says why."""


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# backend -> '' or why its library does not load, plus "triton?" and "cuda device"; a plain dict so dynamo reads it
_STATUS = {"torch": ""}


def _library_status(backend: str) -> str:
    """'' when the backend's library loads, else the reason it does not (looked up once)."""
    if backend in _STATUS:
        return _STATUS[backend]
    if backend == "triton":
        try:
            import triton  # noqa: F401
            reason = ""
        except Exception as e:  # ImportError, or a broken install raising anything
            reason = f"Triton does not import ({type(e).__name__}: {e}); pip install triton"
    else:
        reason = importlib.import_module(f".{backend}_lib", __package__).load_error()   # cuda_lib, cpu_lib
    _STATUS[backend] = reason
    return reason


def why_not(backend: str, op: str | None, device_type: str) -> str:
    """'' if ``backend`` can run ``op`` (any op when None) on ``device_type`` tensors, else the reason:
    the most basic missing thing first (software, device, library, then the op)."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; expected one of {BACKENDS} or 'auto'"
    if backend == "triton" and not _triton_installed():
        return "Triton is not installed (pip install triton; torch's CUDA wheels bring it)"
    if device_type == "cuda" and _no_cuda_device():
        return _no_cuda_device()
    # Then the device, which needs no import (CPU-only users never load Triton or the CUDA library).
    if backend == "triton" and device_type != "cuda" and not (device_type == "cpu" and _triton_interpret()):
        return (f"Triton runs on CUDA/ROCm tensors, not {device_type} tensors"
                + ("; for CPU tensors set TRITON_INTERPRET=1 (the test interpreter) before importing triton"
                   if device_type == "cpu" else ""))
    if backend in ("cuda", "cpu") and device_type != backend:
        return f"the {backend.upper()} library runs on {backend.upper()} tensors, not {device_type} tensors"
    reason = _library_status(backend)
    if not reason and op is not None and implementation(op, backend) is None:
        reason = f"the {backend} backend has no kernel for {op}"
    return reason


def _triton_installed() -> bool:
    if "triton?" not in _STATUS:   # find_spec looks for the package without importing it
        _STATUS["triton?"] = "" if importlib.util.find_spec("triton") is not None else "no"
    return not _STATUS["triton?"]


def _no_cuda_device() -> str:
    """'' when torch sees a CUDA (or ROCm) device, else the most basic reason it does not."""
    if "cuda device" not in _STATUS:
        if torch.cuda.is_available():
            reason = ""
        elif torch.version.cuda is None and torch.version.hip is None:
            reason = f"no CUDA device: this torch ({torch.__version__}) is a CPU-only build"
        else:   # torch's own reason (no driver, no visible device, ...)
            try:
                torch.cuda.init()
                reason = "no CUDA device: torch sees no usable GPU"
            except Exception as e:
                reason = f"no CUDA device: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        _STATUS["cuda device"] = reason
    return _STATUS["cuda device"]


def accepts(backend: str, device_type: str) -> bool:
    """Whether ``backend`` ever runs ``device_type`` tensors (the Triton interpreter counts for CPU)."""
    return backend == "torch" or (backend == "triton" and device_type in ("cuda", "cpu")) or backend == device_type


class _Local(threading.local):
    backend = None   # a class default: reading an unset per-thread attribute raises inside getattr (0.4 us)


_local = _Local()
_ENV_KEY = os.environ.encodekey("TINYRECON_BACKEND")


def env_backend() -> str | None:
    """``TINYRECON_BACKEND`` from os.environ's own dict: ``os.environ.get`` encodes the key on every
    call (0.7 us of the ~10 us a small kept-W apply takes); writes through os.environ update it."""
    value = os.environ._data.get(_ENV_KEY)
    return None if value is None else os.environ.decodevalue(value)


def check_name(backend, source: str = "backend") -> str:
    """``backend`` if it names a backend or 'auto'; else a ValueError naming where it came from."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown {source} {backend!r}; expected one of {BACKENDS} or 'auto'")
    return backend


@contextlib.contextmanager
def use_backend(backend: str):
    """Run ops in this block on ``backend`` ('torch', 'triton', 'cuda', 'cpu' or 'auto')."""
    check_name(backend)
    previous = _local.backend
    _local.backend = backend
    try:
        yield
    finally:
        _local.backend = previous


def requested(backend: str | None = None) -> str:
    """The backend asked for: per call, else per block, else TINYRECON_BACKEND, else 'auto'."""
    choice = backend or _local.backend
    if choice:
        return choice
    env = env_backend()
    return check_name(env, "TINYRECON_BACKEND") if env else "auto"


def resolve(op: str, device_type: str, backend: str | None = None) -> str:
    """Name of the backend that will run ``op`` on ``device_type`` tensors."""
    choice = requested(backend)
    if choice == "auto":
        order = AUTO.get(device_type, ("torch",))
        if device_type == "cuda" and op in AUTO_CUDA_OPS:
            order = ("cuda",) + order
        for candidate in order:
            if not why_not(candidate, op, device_type):
                return candidate
        return "torch"
    reason = why_not(choice, op, device_type)
    if reason:
        raise BackendUnavailable(f"backend {choice!r} cannot run {op}: {reason}")
    return choice


_IMPLS: dict = {}   # (op, backend) -> function; filled by preload() so that get() is a lookup


def implementation(op: str, backend: str):
    """What ``backend`` runs for ``op``: its registered function, the one of its FALLBACK, or None."""
    if (op, backend) not in _IMPLS:   # looked up once: None when neither has it
        from . import ops
        if op not in ops.OPS:
            raise ValueError(f"unknown op {op!r}; known: {sorted(ops.OPS)}")
        for b in (backend, FALLBACK.get(backend)):
            if b is not None:
                importlib.import_module(MODULES[b].format(family=ops.OPS[op].family))   # registers b's ops
                if b in ops.OPS[op].impls:
                    _IMPLS[(op, backend)] = ops.OPS[op].impls[b]
                    break
        else:
            _IMPLS[(op, backend)] = None
    return _IMPLS[(op, backend)]


def table(device_type: str = "cpu") -> dict:
    """op -> {backend: "kernel", "reference" (its FALLBACK runs it) or why it cannot run} for
    ``device_type`` tensors; e.g. ``table()["kron_build"]["cpu"] == "reference"``."""
    from . import ops
    return {name: {b: why_not(b, name, device_type) or ("kernel" if b != "torch" and b in op.impls else "reference")
                   for b in BACKENDS} for name, op in ops.OPS.items()}


def preload() -> None:
    """Import the ops of every backend that can run here, at import: ``torch.compile`` cannot trace one."""
    from . import ops
    device_types = {"cpu"} | ({"cuda"} if torch.cuda.is_available() else set())
    for op in ops.OPS:
        for backend in BACKENDS:
            if any(not why_not(backend, op, d) for d in device_types):
                implementation(op, backend)


def get(op: str, device_type: str, backend: str | None = None):
    """The function running ``op`` for these tensors (see :mod:`tinyrecon.ops`)."""
    name = resolve(op, device_type, backend)
    impl = _IMPLS.get((op, name))
    return impl if impl is not None else implementation(op, name)   # e.g. TRITON_INTERPRET set after import


def small_linear(op: str, device_type: str, backend: str | None = None):
    """The fused small apply of build ``op`` on the backend that runs it (``small_linear(rec, n, D, w)``
    of its module, which gives a callable ``(x, w, bias) -> y`` or None), or None where it has none."""
    from . import ops
    module = importlib.import_module(MODULES[resolve(op, device_type, backend)].format(family=ops.OPS[op].family))
    return getattr(module, "small_linear", None)


def available(device_type: str = "cuda") -> dict:
    """backend -> '' (can run ``device_type`` tensors here) or the reason it cannot, for the
    backends that ever run such tensors (the CUDA library is not listed for CPU tensors)."""
    try:
        torch.device(device_type)
    except (RuntimeError, TypeError):
        hint = (f"; available('cuda')[{device_type!r}] says whether the {device_type} backend runs on CUDA tensors"
                if device_type in BACKENDS else "")
        raise ValueError(f"available() takes a device type such as 'cuda', 'cpu' or 'mps', "
                         f"not {device_type!r}{hint}") from None
    return {b: why_not(b, None, device_type) for b in BACKENDS if accepts(b, device_type)}
