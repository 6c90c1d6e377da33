"""What every Triton module shares: autotuning, and the dtypes kernels compute in."""
import os
import threading

import torch
import triton
import triton.language as tl

# The interpreter (TRITON_INTERPRET=1) runs kernels on CPU tensors; autotuning there only costs time.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# GPU test runs may skip tuning (TINYRECON_AUTOTUNE=first, bench/gpu_check.sh): tests use many shapes.
_FIRST_ONLY = os.environ.get("TINYRECON_AUTOTUNE", "") == "first"

_TL = {torch.float64: tl.float64, torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
# Tests (TINYRECON_ALL_CONFIGS=1, interpreter only): launches take every config in turn, so each is checked.
ALL_CONFIGS = os.environ.get("TINYRECON_ALL_CONFIGS", "0") not in ("", "0")


class _Autotuner(triton.runtime.Autotuner):
    """Triton's autotuner, with the arguments named in ``bucket`` rounded up to a power of two in the
    key: a new batch size within a bucket reuses the tuned config instead of benchmarking them all."""

    def __init__(self, fn, bucket, **kwargs):
        super().__init__(fn, fn.arg_names, **kwargs)
        self.bucket = tuple(bucket)
        self._chosen = {}
        self._lock = threading.Lock()

    def run(self, *args, **kwargs):
        if len(self.configs) == 1:
            return super().run(*args, **kwargs)
        named = {**dict(zip(self.arg_names, args)), **kwargs}
        key = tuple(triton.next_power_of_2(named[k]) if k in self.bucket and named[k] > 0 else named[k]
                    for k in self.keys if k in named)
        key += tuple(str(a.dtype) for a in named.values() if hasattr(a, "dtype"))
        with self._lock:
            config = self._chosen.get(key)
        if config is None:   # tune (Triton caches by the exact key), then remember for the bucket
            ret = super().run(*args, **kwargs)
            with self._lock:
                self._chosen[key] = self.best_config
            return ret
        self.best_config = config
        return self.fn.run(*args, **kwargs, **config.all_kwargs())


def autotune(configs, key, bucket=(), prune=None):
    """``triton.autotune`` over ``configs`` on a GPU; under the interpreter launches take the first
    config, or with ``ALL_CONFIGS`` each in turn. Every constexpr a launcher passes must be in ``key``
    (a config tuned for one value would be reused for another); ``bucket`` arguments (the batch size)
    enter it rounded up to a power of two. ``prune(configs, named_args)`` drops configs that cannot
    run on a GPU (e.g. too much shared memory); it must keep at least one."""
    if INTERPRET:
        return lambda fn: _InTurn(fn, configs)
    configs = configs[:1] if _FIRST_ONLY else configs
    prune_by = {"early_config_prune": lambda cfgs, named, **kw: prune(cfgs, {**named, **kw})} if prune else None
    return lambda fn: _Autotuner(fn, bucket, configs=configs, key=key, prune_configs_by=prune_by,
                                 reset_to_zero=None, restore_value=None)


class _InTurn:
    """``fn[grid](...)`` launched with one of ``configs``: the first, or with ``ALL_CONFIGS`` launch
    i takes ``configs[i % len(configs)]``. ``launches`` counts them; ``used``: the configs' indices."""

    def __init__(self, fn, configs):
        self.fn, self.configs, self.used, self.launches = fn, configs, set(), 0
        self._lock = threading.Lock()

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            with self._lock:
                i = self.launches % len(self.configs) if ALL_CONFIGS else 0
                self.launches += 1
                self.used.add(i)
            return self.fn[grid](*args, **kwargs, **self.configs[i].all_kwargs())
        return launch


@triton.jit
def build_tile(n, D, BI: tl.constexpr, BJ: tl.constexpr):
    """``(c, i, j, ok)`` of a build program (grid ``build_grid``): its channel, the int64 rows (BI x 1)
    and columns (1 x BJ) of its tile of W[c] (n x D), and which are inside."""
    tiles_i = tl.cdiv(n, BI)
    pid_i, pid_j, c = tl.program_id(0) % tiles_i, tl.program_id(0) // tiles_i, tl.program_id(1).to(tl.int64)
    i = (pid_i.to(tl.int64) * BI + tl.arange(0, BI))[:, None]
    j = (pid_j.to(tl.int64) * BJ + tl.arange(0, BJ))[None, :]
    return c, i, j, (i < n) & (j < D)


# A build kernel's tiles of W, for builds that copy or scale entries (the first: the interpreter's).
BUILD_CONFIGS = [triton.Config({"BI": 16, "BJ": 32}, num_warps=1)] + [
    triton.Config({"BI": bi, "BJ": bj}, num_warps=4) for bi, bj in [(32, 128), (64, 64), (16, 256)]]


def build_grid(n: int, D: int, C: int):
    """The grid of a build kernel over W (C, n, D): the tiles in x, whose limit (2^31) no width reaches."""
    return lambda a: (triton.cdiv(n, a["BI"]) * triton.cdiv(D, a["BJ"]), C)


def fewest_values(configs, values, limit: int):
    """The configs whose tiles hold at most ``limit`` fp32 values per thread (``values(config)``
    counts a program's), else the one holding fewest: more than ptxas fits in registers spills."""
    per_thread = {id(c): values(c) / (32 * c.num_warps) for c in configs}
    return [c for c in configs if per_thread[id(c)] <= limit] or [min(configs, key=lambda c: per_thread[id(c)])]


# Reductions split until about two programs run per SM, each split into its own partial (at most
# _MAX_SPLIT partials, each at least _MIN_ROWS rows deep); small under the interpreter, so tests split.
_MAX_SPLIT, _MIN_ROWS = (8, 4) if INTERPRET else (64, 64)


def split_sum(rows: int, blocks: int, programs: int, device) -> tuple[int, int, int]:
    """(row splits, blocks per split, splits) for a sum over ``rows`` and ``blocks`` run by
    ``programs`` output tiles: rows first, then ranges of blocks, so a small batch still fills the GPU."""
    target = 8 if INTERPRET else 2 * sm_count(device)
    want = max(1, min(_MAX_SPLIT, triton.cdiv(target, programs)))
    split_m = max(1, min(want, rows // _MIN_ROWS))
    per = triton.cdiv(blocks, max(1, min(blocks, want // split_m)))
    return split_m, per, split_m * triton.cdiv(blocks, per)


def acc_type(dtype: torch.dtype):
    """Accumulate in float64 for float64 data, float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def inner_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of intermediates in memory: fp32 for half types, so they are rounded once, at the end."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rank_block(r: int) -> int:
    """A rank dimension as one power-of-two tile, at least 16 wide (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(r))


def dot_dtype(dtype: torch.dtype):
    """Dtype of tl.dot operands: the input's, but fp32 for bf16 under the interpreter, whose bf16 dot
    is wrong (Triton 3.7, 3.8); bf16 products are exact in fp32, so the result is what a GPU computes."""
    return tl.float32 if INTERPRET and dtype == torch.bfloat16 else _TL[dtype]


def _tf32_allowed() -> bool:
    """Whether torch's own fp32 matmuls may use TF32 (the new ``fp32_precision`` or the legacy settings)."""
    mm = torch.backends.cuda.matmul
    new = getattr(mm, "fp32_precision", "none")
    if new != "none":
        return new == "tf32"
    try:
        return bool(mm.allow_tf32)
    except RuntimeError:   # torch refuses to read it after a mix of the legacy and new settings
        return torch.get_float32_matmul_precision() != "highest"


def bias_stride(bias) -> int:
    """A bias's element stride (bias may be any 1-D view; kernels read it through this), 0 when absent."""
    return 0 if bias is None else bias.stride(0)


def precision(dtype: torch.dtype) -> str:
    """fp32 inputs: IEEE products (the tolerance is fp32's) unless the user allowed TF32 in torch."""
    return "tf32" if dtype == torch.float32 and _tf32_allowed() else "ieee"


def mixed_precision(dtype: torch.dtype) -> str:
    """Precision of a dot on fp32 operands in a kernel on ``dtype`` data (one operand an fp32 intermediate
    that would overflow or round in ``dtype``): TF32 for fp16/bf16 (it holds their operands exactly, with
    fp32's range), fp32 as ``precision``."""
    return "tf32" if dtype in (torch.float16, torch.bfloat16) else precision(dtype)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``: grids that should fill the GPU are sized with it."""
    return torch.cuda.get_device_properties(device).multi_processor_count
