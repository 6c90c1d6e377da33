"""Counter-based random numbers that Triton kernels reproduce in registers (docs/seeds.md).

Element ``k`` (row-major) of a frozen random matrix is a pure function of ``(seed, k)``: what
Triton's ``tl.rand(seed, k)`` and ``tl.randn(seed, k)`` compute (Philox-4x32-10, counter
``(k_lo, k_hi, 0, 0)``, Triton's int->uniform map and Box-Muller), in torch integer ops that fit
int64 on any device. Uniforms are bit-exact; normals are evaluated in float64 and rounded once, so
float64-accurate implementations (the CPU library's) agree and ``tl.randn`` differs by a few ulp.
"""
from __future__ import annotations

import math
import numbers
import os
import threading
from collections import OrderedDict

import torch

from . import cpu_lib, dispatch

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_CHUNK = 1 << 20  # elements per pass: keeps the ~40 int64 temporaries in cache
SEED_BITS = 63    # seeds are kept in [0, 2**63) so every backend passes them as int64


def _mul32(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of the 64-bit product of the constant ``a`` and ``b`` (both < 2**32)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    lo_lo = a_lo * b_lo
    mid = a_hi * b_lo + a_lo * b_hi + (lo_lo >> 16)
    hi = a_hi * b_hi + (mid >> 16)
    lo = ((mid & 0xFFFF) << 16) | (lo_lo & 0xFFFF)
    return hi, lo


def _philox(seed: int, offsets: torch.Tensor):
    """First two Philox-4x32-10 output words for counters ``offsets`` (int64)."""
    c0, c1 = offsets & _M32, (offsets >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mul32(_ROUND_B, c2)
        hi_a, lo_a = _mul32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1


def _to_uniform(u: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` for 32-bit words: a float32 in [0, 1)."""
    s = torch.where(u >= 1 << 31, u - (1 << 32), u)   # bitcast to int32
    s = torch.where(s < 0, -s - 1, s)                   # ~s
    return s.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def _fill(seed: int, start: int, numel: int, device, kind: str) -> torch.Tensor:
    out = torch.empty(numel, dtype=torch.float32, device=device)
    if out.device.type == "cpu" and not cpu_lib.load_error():   # the same numbers, ~100x faster
        return _block(seed, start, 1, numel, numel, kind)[0]
    return _torch_fill(out, seed, start, numel, kind)


def _torch_fill(out: torch.Tensor, seed: int, start: int, numel: int, kind: str) -> torch.Tensor:
    """The definition, in torch ops on any device."""
    device = out.device
    for lo in range(0, numel, _CHUNK):
        offs = torch.arange(start + lo, start + min(lo + _CHUNK, numel), device=device, dtype=torch.int64)
        r0, r1 = _philox(seed, offs)
        u1 = _to_uniform(r0)
        if kind == "rand":
            out[lo:lo + offs.numel()] = u1
        else:  # Box-Muller on the first two words, first output, as tl.randn
            u2 = _to_uniform(r1).double()
            r = torch.sqrt(-2.0 * torch.log(torch.clamp(u1, min=1.0e-7).double()))
            out[lo:lo + offs.numel()] = r * torch.cos(6.283185307179586 * u2)
    return out


# Regenerating costs more than the GEMM that uses it (see _DEFAULT_MAX_NUMBERS; even the CPU library's
# normals cost several copies from the cache), so recently used matrices are kept per process, least
# recently used out first, within a byte budget (not module state). One lock guards the table; numbers
# are generated outside it (two threads missing on one key both generate it, with equal values). 1 GiB
# holds, at the MNIST layer, random_matrix_hypernet's M (751 MiB at r=5), the bit-packed mask and
# random_matrix_adaption's B; hypernet's 20 GB second layer is drawn block by block where used.
_DEFAULT_BUDGET = 1 << 30
_lock = threading.Lock()
_cache: OrderedDict = OrderedDict()   # key -> tensor (float32 numbers, or int64 mask bits)
_stats = {"bytes": 0, "hits": 0, "misses": 0}


def _budget_from_env() -> int:
    raw = os.environ.get("TINYRECON_CACHE_BYTES")
    if raw is None or raw.strip() == "":
        return _DEFAULT_BUDGET
    try:
        return _check_budget(int(raw.strip()))
    except ValueError:
        raise ValueError(f"TINYRECON_CACHE_BYTES must be a non-negative int (bytes; 0 turns the cache off), "
                         f"got {raw!r}") from None


def _check_budget(nbytes) -> int:
    if isinstance(nbytes, bool) or not isinstance(nbytes, numbers.Integral) or nbytes < 0:
        raise ValueError(f"the cache budget must be a non-negative int (bytes; 0 turns the cache off), got {nbytes!r}")
    return int(nbytes)


_budget = _budget_from_env()


def _evict_to(limit: int) -> None:
    """Drop least recently used entries until the cache holds at most ``limit`` bytes (lock held)."""
    while _stats["bytes"] > limit:
        _, old = _cache.popitem(last=False)
        _stats["bytes"] -= old.numel() * old.element_size()


def set_cache_budget(nbytes: int) -> None:
    """Keep at most ``nbytes`` bytes of frozen random matrices per process (0: none; default 1 GiB, or
    ``TINYRECON_CACHE_BYTES``); bigger matrices are generated on every use."""
    global _budget
    nbytes = _check_budget(nbytes)
    with _lock:
        _budget = nbytes
        _evict_to(nbytes)


def cache_info() -> dict:
    """``{'budget', 'bytes', 'entries', 'hits', 'misses'}`` of the random-matrix cache."""
    with _lock:
        return {"budget": _budget, "bytes": _stats["bytes"], "entries": len(_cache),
                "hits": _stats["hits"], "misses": _stats["misses"]}


def clear_cache() -> None:
    """Drop every cached random matrix and zero the hit/miss counts (the budget stays)."""
    with _lock:
        _cache.clear()
        _stats.update(bytes=0, hits=0, misses=0)


# Generating costs about 100 ns per number and core in torch ops (3.5 ns a normal in the CPU library):
# 2**35 numbers are an hour of a core in torch. A call asking for more (hypernets at n = D = 2**16: 2**39)
# is refused before any work unless TINYRECON_MAX_RANDOM raises the limit (MNIST's hypernet, 5e9, runs).
_DEFAULT_MAX_NUMBERS = 1 << 35


def check_cost(count: int, what: str) -> None:
    """Refuse to draw ``count`` random numbers for ``what`` when that is above the limit."""
    raw = os.environ.get("TINYRECON_MAX_RANDOM")
    try:
        limit = _DEFAULT_MAX_NUMBERS if raw is None or raw.strip() == "" else int(raw)
    except ValueError:
        raise ValueError(f"TINYRECON_MAX_RANDOM must be an int (random numbers per call), got {raw!r}") from None
    if count > limit:
        raise ValueError(
            f"{what} would draw {count:,} random numbers (about {count * 1e-7 / 60:,.0f} core-minutes in torch, "
            f"{count * 4 / 2**30:,.0f} GiB as float32), above the limit of {limit:,}; check n, D and the "
            f"function's sizes, or set TINYRECON_MAX_RANDOM={count} to run it anyway")


def _values(seed: int, start: int, numel: int, device: torch.device, kind: str, shared: bool = False) -> torch.Tensor:
    # Traced calls take the op, whose output is the caller's own: compiled graphs may reuse it.
    return _draw(seed, start, numel, device, kind, shared) if dispatch.eager() else _values_op(seed, start, numel, device, kind)


def _draw(seed: int, start: int, numel: int, device: torch.device, kind: str, shared: bool = False) -> torch.Tensor:
    if device.type == "meta":   # shapes only: nothing to draw
        return torch.empty(numel, dtype=torch.float32, device=device)
    check_cost(numel, "this random matrix")

    def make():
        # A plain tensor even when the first call runs under torch.inference_mode(): an inference
        # tensor, once kept, could not be saved for a later call's backward.
        with torch.inference_mode(False):
            return _fill(seed, start, numel, device, kind)
    kept = _kept((seed, start, numel, device, kind), numel * 4, make)
    if kept is None:
        return _fill(seed, start, numel, device, kind)
    # shared: the cache's own tensor, for read-only callers (copying RMA's B cost a fifth of its apply).
    return kept if shared else kept.clone()


def _kept(key, nbytes: int, make):
    """The cache's tensor for ``key``, ``make()``'s on a miss (made outside the lock); None over the budget."""
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            _stats["hits"] += 1
            return hit
        _stats["misses"] += 1
        if nbytes > _budget:
            return None
    value = make()
    with _lock:
        if key not in _cache:
            _cache[key] = value
            _stats["bytes"] += nbytes
            _evict_to(_budget)
    return value


def kept_slices(seed: int, slices, kind: str) -> list | None:
    """Numbers ``[start, start + numel)`` of seed for each ``(start, numel)`` of ``slices`` (float32, CPU):
    the cache's own entries, read only; None when together they do not fit the budget."""
    if sum(numel for _, numel in slices) * 4 > cache_info()["budget"]:
        return None
    device = torch.device("cpu")
    kept = []
    for start, numel in slices:
        check_cost(numel, "this random matrix")
        kept.append(_kept((seed, start, numel, device, kind), numel * 4,
                          lambda start=start, numel=numel: _fill(seed, start, numel, device, kind)))
    return None if any(t is None for t in kept) else kept


def _owned(seed: int, start: int, numel: int, device: torch.device, kind: str) -> torch.Tensor:
    return _draw(seed, start, numel, device, kind)


# One opaque op, so torch.compile neither traces the 10 Philox rounds nor breaks the graph.
_values_op = dispatch.traced_op("philox_values", _owned, lambda seed, start, numel, device, kind: torch.empty(
    numel, dtype=torch.float32, device=device)).op


def mask_bits(seed: int, rows: int, cols: int, p: float) -> torch.Tensor | None:
    """The rows x cols mask ``rand(seed) < p``, bit-packed by the CPU library (bit b of int64 word q of
    a row is column 64q + b) and kept in the cache (1/32 of the float32 mask); read only. None when it
    does not fit the budget (callers then draw the mask where they use it)."""
    words = (cols + 63) // 64

    def make():
        check_cost(rows * cols, "this mask")
        bits = torch.empty(rows, words, dtype=torch.int64)
        if bits.numel():
            cpu_lib.call("tinyrecon_cpu_mask_bits", torch.get_num_threads(), seed, rows, cols, p, bits.data_ptr())
        return bits
    return _kept(("mask_bits", seed, rows, cols, float(p)), rows * words * 8, make)


def _block(seed: int, start: int, rows: int, cols: int, stride: int, kind: str) -> torch.Tensor:
    """The (rows, cols) CPU block whose ``(i, j)`` is number ``start + i*stride + j``, made where used (not cached)."""
    out = torch.empty(rows, cols)
    if cpu_lib.load_error():
        for i in range(rows):
            _torch_fill(out[i], seed, start + i * stride, cols, kind)
    elif out.numel():
        cpu_lib.call("tinyrecon_cpu_philox_fill", int(kind == "randn"), torch.get_num_threads(), seed, start,
                     rows, cols, stride, out.data_ptr())
    return out


block = dispatch.traced_op("philox_block", _block, lambda seed, start, rows, cols, stride, kind: torch.empty(rows, cols))


def rand(seed: int, shape, device=None, dtype=torch.float32, start: int = 0, shared: bool = False) -> torch.Tensor:
    """U[0, 1) values equal to ``tl.rand(seed, start + arange(numel)).reshape(shape)``."""
    return _matrix(seed, shape, device, dtype, start, "rand", shared)


def randn(seed: int, shape, device=None, dtype=torch.float32, start: int = 0, shared: bool = False) -> torch.Tensor:
    """N(0, 1) values equal to ``tl.randn(seed, start + arange(numel)).reshape(shape)``. ``start``
    selects rows of a larger matrix; ``shared``: the cached float32 numbers themselves, not a copy, for
    a caller that never writes them."""
    return _matrix(seed, shape, device, dtype, start, "randn", shared)


def _matrix(seed: int, shape, device, dtype: torch.dtype, start: int, kind: str, shared: bool) -> torch.Tensor:
    shape = tuple(int(s) for s in shape)
    return _values(seed, start, math.prod(shape), torch.device(device or "cpu"), kind, shared).reshape(shape).to(dtype)


def derive_seed(seed: int, stream: int) -> int:
    """Independent seed for the ``stream``-th frozen matrix of one function (SplitMix64 finaliser:
    unlike ``seed + stream``, neighbouring user seeds share no matrices)."""
    z = (seed + (stream + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & ((1 << SEED_BITS) - 1)


def new_seed() -> int:
    """A seed drawn from torch's global generator (so ``torch.manual_seed`` makes it repeatable)."""
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())

