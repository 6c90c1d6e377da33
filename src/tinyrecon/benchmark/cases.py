"""The cases: functions, shapes and ops, the names that select them, and why a case cannot run here."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import dispatch, registry

OPS = ("build", "fwd", "fwdbwd", "train")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


@dataclass(frozen=True)
class Shape:
    name: str
    n: int
    D: int
    batch: int


SHAPES = {s.name: s for s in (
    Shape("small", 6, 12, 8),              # what the Triton interpreter can run
    Shape("tiny", 6, 12, 64),              # a tiny layer at a training batch: overheads, not bandwidth
    Shape("square1024", 1024, 1024, 64),
    Shape("square4096", 4096, 4096, 64),
    Shape("tall", 64, 65536, 64),          # a tall RPN layer
    Shape("mnist", 64, 615440, 64),        # tinyBIG's MNIST RPN layer (D = 784 * 785)
)}
QUICK_SHAPES = ("small", "tiny", "tall")
# --quick also runs the headline cases: forward+backward of dual_lphm (p=8, q=784, r=5) on the MNIST layer.
QUICK_EXTRA = (("dual_lphm", "mnist", "fwdbwd"), ("dual_lphm", "mnist", "train"))

FUNCTIONS = tuple(registry.CLASSES)   # short names, in docs/functions.md order
FAMILY = {f: cls.__module__.rsplit(".", 1)[-1] for f, cls in registry.CLASSES.items()}
FAMILIES = tuple(dict.fromkeys(FAMILY.values()))

# Cold timings: functions whose first call fills the random-matrix cache at every shape, others at COLD_SHAPE.
COLD_FUNCTIONS = ("masking", "random_matrix_adaption", "random_matrix_hypernet", "hypernet")
COLD_SHAPE = "mnist"


@dataclass(frozen=True)
class Case:
    function: str
    shape: str
    op: str
    backend: str

    @property
    def id(self) -> str:
        return f"{self.function}-{self.shape}-{self.op}-{self.backend}"


def times_cold(case: Case) -> bool:
    """Whether the case's first call in a fresh process is timed too, when cold timings are on."""
    return case.op != "build" and (case.function in COLD_FUNCTIONS or case.shape == COLD_SHAPE)


def _split(names) -> list[str]:
    """Names given as a list and/or comma-separated, in order, without repeats."""
    parts = (p.strip() for name in names for p in str(name).split(","))
    return list(dict.fromkeys(p for p in parts if p))


def _pick(names, valid, what: str) -> list[str]:
    out = _split(names)
    for name in out:
        if name not in valid:
            raise ValueError(f"unknown {what} {name!r}; valid: {', '.join(valid)}")
    return out


def dtypes(names) -> list[torch.dtype]:
    """torch dtypes for dtype names (a list and/or comma-separated); ValueError lists the valid ones."""
    return [DTYPES[name] for name in _pick(names, DTYPES, "dtype")]


def family_functions(family: str) -> list[str]:
    return [f for f in FUNCTIONS if FAMILY[f] == family]


def function_names(names) -> list[str]:
    """Short names for function names, tinyBIG class names/paths or families; a name that is both means the function."""
    out = []
    for name in _split(names):
        try:
            out.append(registry.lookup(name).__name__[: -len(registry.SUFFIX)])
        except ValueError:
            if name not in FAMILIES:
                raise ValueError(f"unknown function {name!r}; valid: {', '.join(FUNCTIONS)} "
                                 f"or a family: {', '.join(FAMILIES)}") from None
            out += family_functions(name)
    return list(dict.fromkeys(out))


def select(functions=None, shapes=None, backends=None, ops=None, quick=True) -> list[Case]:
    """The cases to run; ``None`` means the default (``quick``: QUICK_SHAPES plus QUICK_EXTRA; otherwise
    every shape). Unknown names raise ValueError listing valid ones."""
    fs = function_names(functions) if functions else list(FUNCTIONS)
    ss = _pick(shapes, SHAPES, "shape") if shapes else list(QUICK_SHAPES if quick else SHAPES)
    bs = _pick(backends, dispatch.BACKENDS, "backend") if backends else list(dispatch.BACKENDS)
    os_ = _pick(ops, OPS, "op") if ops else list(OPS)
    cases = [Case(f, s, op, b) for s in ss for f in fs for op in os_ for b in bs]
    if quick and not shapes:
        cases += [Case(f, s, op, b) for f, s, op in QUICK_EXTRA if f in fs and op in os_ for b in bs]
    return cases


def make_function(name: str):
    """The function with its ``bench_args`` (the rest are tinyBIG's defaults; p and q default to the divisors
    closest to sqrt(n), sqrt(D): at the mnist shape that is the headline p=8, q=784)."""
    return registry.reconciliation(name, **registry.CLASSES[name].bench_args)


def dispatch_op(case: Case) -> str | None:
    prefix = registry.CLASSES[case.function].op
    return prefix and f"{prefix}_{'build' if case.op == 'build' else 'apply'}"


def proc_field(path: str, key: str) -> str | None:
    """The value of ``key`` in a ``key: value`` file of /proc (cpuinfo, meminfo), or None where there is none."""
    try:
        with open(path) as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":", 1)[0].strip() == key), None)
    except OSError:
        return None


def skip_reason(case: Case, device: torch.device, dtype: torch.dtype) -> str:
    """'' if the case can run here, else why not (shown in the results, never silently dropped)."""
    op = dispatch_op(case)
    if op is None:
        if case.backend != "torch":
            return "no kernels: plain torch code on every device"
    else:
        reason = dispatch.why_not(case.backend, op, device.type)   # a missing kernel included
        if reason:
            return reason
    shape = SHAPES[case.shape]
    if case.backend == "triton" and device.type != "cuda" and case.shape != "small":
        return "the Triton interpreter (TRITON_INTERPRET=1) is for correctness checks: small shape only"
    # Peak memory, roughly: W, dW and the dense layer (+ grad) in dtype and W, dW in float64; x, dx alike.
    size = torch.finfo(dtype).bits // 8
    need = shape.n * shape.D * (4 * size + 2 * 8) + shape.batch * shape.D * (2 * size + 2 * 8)
    kb = proc_field("/proc/meminfo", "MemAvailable")   # "123456 kB"
    avail = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else kb and int(kb.split()[0]) * 1024
    if avail is not None and need > avail // 2:
        return f"needs about {need / 2**30:.1f} GiB, more than half of the {avail / 2**30:.1f} GiB available"
    return ""
