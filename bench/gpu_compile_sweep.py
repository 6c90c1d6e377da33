"""Compile every Triton kernel the package launches for real GPUs, with no GPU, and check what a GPU enforces.

Launches are captured from the package's own launchers (``rec.apply`` / ``rec(...)`` forward and
backward, ``backend="triton"``) on CPU tensors: ``JITFunction.run`` and ``Autotuner.run`` are replaced
by recorders, so nothing runs and values do not matter, only shapes, dtypes and the Python-side
choices (grids, constexprs, autotune keys). Each autotuner contributes every config it can choose
(after its pruning). Every distinct (kernel, specialization, config) is compiled ahead of time with
``triton.compile(ASTSource(...), target=GPUTarget(...))`` and checked:

- it compiles;
- its shared memory fits the arch (sm_80: 163 KB, sm_90: 227 KB per block);
- its grid fits CUDA's limits (x < 2^31, y and z <= 65535), for every config (no compile needed);
- no register spills (ptxas -v) in fp32/fp16/bf16 kernels, unless the kernel's module declares a
  budget for it in ``SPILL_BUDGET`` (bytes of spill stores, with the reason);
- every constexpr a launcher passes to an autotuned kernel is in its autotune key (a config tuned
  for one value would otherwise be reused for another, with other resource needs);
- the batch size enters autotune keys only as a power-of-two bucket (no retuning per batch size).

``--ci`` captures fewer dtypes at the large shapes and compiles a representative subset (see
``select``); grids and keys are checked for every captured launch either way. The default is the
full sweep. Writes a JSON/markdown report with ``--out``; exits 1 on any failure. Needs no GPU
(TRITON_INTERPRET is switched off for this process).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

os.environ["TRITON_INTERPRET"] = "0"     # compile for GPUs; kernels pick their GPU configs

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import tinyrecon as tr  # noqa: E402
import tinyrecon.kernels._common  # noqa: E402,F401  (its autotuner class, for the recorder)
from tinyrecon import dispatch  # noqa: E402

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}   # max dynamic shared memory per block (opt-in)
GRID_LIMIT = (2**31 - 1, 65535, 65535)
SMS = 132                                          # H100/H200 SXM: what the launchers size grids for
BATCH_ARGS = {"N", "M", "ROWS"}                    # autotune-key names that carry the batch size


# ---- cases -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    function: str
    kwargs: tuple
    n: int
    D: int
    N: int
    C: int = 1
    layout: str | None = None

    @property
    def id(self):
        kw = ",".join(f"{k}={v}" for k, v in self.kwargs)
        layout = f",layout={self.layout}" if self.layout else ""
        return f"{self.function}({kw}{layout}) n={self.n} D={self.D} N={self.N} C={self.C}"


# Functions whose build has a backward in torch alone (no launch to capture; slow on CPU at MNIST size).
TORCH_BUILD_BACKWARD = {"hm", "lphm", "dual_lphm", "duplicated_padding", "duplicated_diagonal_padding"}
WIDE = 3 * 2**20   # > 2^21 columns: grids over D must not reach CUDA's 65,535 limit in y or z


def cases(ci: bool) -> list[tuple[Case, tuple]]:
    """(case, dtypes): the MNIST layer (n=64, D=615,440), a small odd shape with two channels,
    inputs wider than 2^21 columns, and rank tiles up to 128. CI captures the large shapes in fewer
    dtypes (the capture runs the torch parts of the backward for real, on CPU)."""
    every = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    some = (torch.float32, torch.float16) if ci else every
    out = []
    shapes = [(dict(n=64, D=615440, N=32), (8, 784), some), (dict(n=6, D=15, N=5, C=2), (2, 3), every),
              (dict(n=4, D=WIDE, N=3), (2, 3), some[:1] if ci else every)]
    for shape, (p, q), dtypes in shapes:
        for f, kw in [("hm", dict(p=p, q=q)), ("lphm", dict(p=p, q=q, r=5)), ("dual_lphm", dict(p=p, q=q, r=5)),
                      ("duplicated_padding", dict(p=p, q=q)), ("duplicated_diagonal_padding", dict(p=p, q=q)),
                      ("lorr", dict(r=5)), ("random_matrix_adaption", dict(r=5, seed=0)),
                      ("masking", dict(seed=0)), ("hypernet", dict(seed=0, hidden_dim=16)),
                      ("random_matrix_hypernet", dict(r=5, seed=0))]:
            out.append((Case(f, tuple(kw.items()), **shape), dtypes))
        for f in ("hm", "duplicated_padding"):
            out.append((Case(f, (("p", p), ("q", q)), layout="tinybig", **shape), dtypes))
    mnist = shapes[0][0]
    for r in (128,) if ci else (2, 16, 128):   # rank tiles 16 .. 128
        out += [(Case(f, kw + (("r", r),), **mnist), some[:1] if ci else every)
                for f, kw in [("lorr", ()), ("random_matrix_adaption", (("seed", 0),)),
                              ("dual_lphm", (("p", 8), ("q", 784)))]]
    if not ci:
        out.append((Case("lorr", (("r", 16),), n=64, D=615440, N=1), every))        # batch 1
    return out


# ---- capture -----------------------------------------------------------------------------------
@dataclass
class Launch:
    kernel: JITFunction
    args: tuple
    kwargs: dict
    grid: tuple
    tuner: Autotuner | None = None
    config: triton.Config | None = None
    biggest: bool = False    # the config with the largest tile volume
    tags: set = field(default_factory=set)

    @property
    def name(self):
        return self.kernel.fn.__name__


_LAUNCHES: list[Launch] = []
_KEY_PROBLEMS: set[str] = set()


def _grid(grid, named):
    g = grid(named) if callable(grid) else grid
    return tuple(int(v) for v in g) + (1,) * (3 - len(g))


def _record_jit(self, *args, grid, warmup, **kwargs):
    named = dict(zip(self.arg_names, args), **kwargs)
    _LAUNCHES.append(Launch(self, args, kwargs, _grid(grid, named)))


def _volume(cfg):
    v = cfg.num_warps
    for val in cfg.kwargs.values():
        v *= val
    return v


def _record_tuner(self, *args, grid, warmup, **kwargs):
    self.nargs = dict(zip(self.arg_names, args))
    named = {**self.nargs, **kwargs}
    name = self.base_fn.__name__
    for k, v in kwargs.items():   # constexprs chosen by the launcher: must be part of the key
        if k not in self.keys:
            _KEY_PROBLEMS.add(f"{name}: launcher constexpr {k} is not in the autotune key {self.keys}")
    for k in set(self.keys) & BATCH_ARGS - set(getattr(self, "bucket", ())):
        _KEY_PROBLEMS.add(f"{name}: autotune key {k} carries the batch size but is not bucketed")
    configs = self.prune_configs(kwargs)
    big = max(configs, key=_volume)
    for cfg in configs:
        full = {**kwargs, **cfg.all_kwargs()}
        _LAUNCHES.append(Launch(self.fn, args, full, _grid(grid, {**named, **cfg.all_kwargs()}), self, cfg,
                                biggest=cfg is big))
    self.nargs = None


class _Props:
    multi_processor_count = SMS


def capture(case_list):
    """Run every case's forward and backward (apply and build), in its dtypes, with the recorders in place."""
    JITFunction.run = _record_jit
    for cls in (Autotuner, *Autotuner.__subclasses__()):   # the package's own autotuner too
        cls.run = _record_tuner
    dispatch._triton_interpret = lambda: True            # lets the dispatcher route CPU tensors to Triton
    torch.cuda.get_device_properties = lambda *a: _Props()
    errors = []
    for case, dtypes in case_list:
        for dtype in dtypes:
            start = len(_LAUNCHES)
            try:
                _run_case(case, dtype)
            except Exception as e:  # a launcher that fails on the CPU side is a finding too
                errors.append(f"{case.id} {dtype}: {type(e).__name__}: {e}")
            for launch in _LAUNCHES[start:]:
                launch.tags.add(f"{case.id} {str(dtype)[6:]}")
    return errors


def _run_case(case, dtype):
    kw = dict(case.kwargs)
    if case.layout:
        kw["layout"] = case.layout
    rec = tr.reconciliation(case.function, **kw)
    l = rec.calculate_l(case.n, case.D)
    w = torch.randn(case.C, l, dtype=dtype, requires_grad=True)
    x = torch.empty(case.N, case.D, dtype=dtype).requires_grad_()
    b = torch.zeros(case.n, dtype=dtype, requires_grad=True)
    y = rec.apply(x, w, n=case.n, bias=b, backend="triton")
    y.backward(torch.ones_like(y))
    W = rec(n=case.n, D=case.D, w=w, backend="triton")   # the build (W itself)
    if case.function not in TORCH_BUILD_BACKWARD:
        W.backward(torch.ones_like(W))


# ---- compile -----------------------------------------------------------------------------------
_REG_RE = re.compile(r"Used (\d+) registers")


@dataclass
class Result:
    kernel: str
    target: str
    spec: str
    ok: bool
    error: str = ""
    shared: int = 0
    regs: int | None = None
    spills: int | None = None
    mma: bool | None = None
    seconds: float = 0.0
    tags: list = field(default_factory=list)


_BINDERS: dict = {}


def _compile(launch: Launch, target: GPUTarget):
    backend = make_backend(target)
    bkey = (id(launch.kernel), target.arch)
    if bkey not in _BINDERS:
        _BINDERS[bkey] = create_function_from_signature(launch.kernel.signature, launch.kernel.params, backend)
    bound, spec, options = _BINDERS[bkey](*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = launch.kernel._pack_args(backend, launch.kwargs, bound, spec, options)
    key = (launch.name, str(target), str(signature), str(sorted(constexprs.items())), str(attrs), str(options))
    return key, lambda: triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                                       options=options.__dict__)


def _describe(launch):
    cfg = launch.config
    c = {k: v for k, v in launch.kwargs.items() if not (cfg and k in cfg.kwargs)}
    names = [x.name for x in launch.kernel.params]
    dtypes = sorted({str(a.dtype)[6:] for a in launch.args if isinstance(a, torch.Tensor)})
    s = ",".join(f"{k}={getattr(v, 'name', v)}" for k, v in c.items() if k in names)
    if cfg:
        s += f" | {','.join(f'{k}={v}' for k, v in cfg.kwargs.items())} w{cfg.num_warps} s{cfg.num_stages}"
    return f"[{'/'.join(dtypes)}] {s}"


def _budget(kernel_name, module):
    mod = sys.modules[module]
    return getattr(mod, "SPILL_BUDGET", {}).get(kernel_name, (0, ""))[0]


def select(launches, ci, amd):
    """(launch, target) pairs to compile. Full: every captured config for sm_80 and sm_90 (and
    gfx942 with ``amd``). CI: for each kernel, its largest config on fp16 data (the half-precision
    tensor-core path) for sm_80 and sm_90, and its largest rank tile on fp32 data for sm_80 (the
    arch with the least shared memory)."""
    sm80, sm90 = GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32)
    targets = [sm80, sm90] + ([GPUTarget("hip", "gfx942", 64)] if amd else [])
    if not ci:
        return [(x, t) for x in launches for t in targets]
    big = [x for x in launches if x.tuner is None or x.biggest]
    pairs = []
    for name in dict.fromkeys(x.name for x in big):
        mine = [x for x in big if x.name == name]
        half = [x for x in mine if _dtypes(x) == {"float16"}] or mine
        pairs += [(half[0], t) for t in targets]
        ranked = [x for x in mine if _dtypes(x) == {"float32"} and _rank_tile(x)]
        if ranked:
            pairs.append((max(ranked, key=_rank_tile), sm80))
    return pairs


def _dtypes(launch):
    return {str(a.dtype)[6:] for a in launch.args if isinstance(a, torch.Tensor) and a.is_floating_point()}


def _rank_tile(launch):
    return max(launch.kwargs.get(k, 0) for k in ("RP", "RPA", "RPB"))


def compile_all(pairs):
    unique = {}
    for launch, target in pairs:
        key, job = _compile(launch, target)
        if key not in unique:
            unique[key] = (launch, target, job, set())
        unique[key][3].update(launch.tags)

    def run(item):
        launch, target, job, tags = item
        t0 = time.time()
        log = io.StringIO()
        res = Result(launch.name, f"{target.backend}:{target.arch}", _describe(launch), True,
                     tags=sorted(tags)[:3])
        try:
            with contextlib.redirect_stdout(log):
                k = job()
        except Exception as e:
            res.ok, res.error = False, f"{type(e).__name__}: {str(e)[:300]}"
            res.seconds = time.time() - t0
            return res
        res.seconds = time.time() - t0
        res.shared = k.metadata.shared
        if target.backend == "cuda":
            text = log.getvalue()
            regs = _REG_RE.findall(text)
            spills = re.findall(r"(\d+) bytes spill stores", text)
            res.regs = int(regs[0]) if regs else None
            res.spills = int(spills[0]) if spills else None
            res.mma = bool(re.search(r"\b(mma|wgmma)\.", k.asm["ptx"]))
        return res

    triton.knobs.nvidia.dump_ptxas_log = True   # Triton prints ptxas -v to stdout: one compile at a time
    items = list(unique.values())
    return [run(item) for item in items], items


def check(results, items, launches):
    problems = []
    for res, (launch, target, _, _) in zip(results, items):
        where = f"{res.kernel} {res.target} {res.spec}"
        if not res.ok:
            problems.append(f"compile failed: {where}: {res.error}")
            continue
        if target.backend == "cuda":
            if res.shared > SHARED_LIMIT[target.arch]:
                problems.append(f"shared memory {res.shared} B > {SHARED_LIMIT[target.arch]} B: {where}")
            fp64 = "float64" in res.spec
            if res.spills is None:
                problems.append(f"no ptxas report: {where}")
            elif res.spills and not fp64 and res.spills > _budget(launch.name, launch.kernel.fn.__module__):
                problems.append(f"{res.spills} B of register spills: {where}")
    for launch in launches:
        g = launch.grid
        if g[0] > GRID_LIMIT[0] or g[1] > GRID_LIMIT[1] or g[2] > GRID_LIMIT[2]:
            problems.append(f"grid {g} over CUDA's limits: {launch.name} {_describe(launch)} "
                            f"({sorted(launch.tags)[0]})")
    return sorted(set(problems))


# ---- the CUDA library: ptxas -v of every kernel in csrc/*.cu ------------------------------------
_ENTRY_RE = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
CUDA_STATIC_SHARED = 48 * 1024    # static __shared__ per block (more needs dynamic shared memory)


def cuda_report(archs=(80, 90)):
    """(rows, problems): per kernel and arch, registers, spill stores and static shared memory from
    ``nvcc -Xptxas -v``; a problem is a spill in a non-fp64 kernel or shared memory over 48 KB."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import build_libs
    nvcc = build_libs.find_nvcc()
    if nvcc is None:
        print("nvcc not found: no ptxas report of the CUDA library")
        return [], []
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    csrc = os.path.join(root, "csrc")
    sources = [os.path.join(csrc, f) for f in sorted(os.listdir(csrc))
               if f.endswith(".cu") and "__global__" in open(os.path.join(csrc, f)).read()]
    gencode = [f for a in archs for f in ("-gencode", f"arch=compute_{a},code=sm_{a}")]
    rows, problems = [], []
    for src in sources:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [nvcc, "-std=c++20", "-O3", "-c", *gencode, "-Xptxas", "-v", src, "-o", os.path.join(tmp, "k.o")]
            out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            problems.append(f"nvcc failed on {src}: {out.stderr[-500:]}")
            continue
        names = _demangle(_ENTRY_RE.findall(out.stderr))
        for (mangled, arch), block in zip(_ENTRY_RE.findall(out.stderr), _ENTRY_RE.split(out.stderr)[3::3]):
            regs = int((_REG_RE.findall(block) or [0])[0])
            spills = int((re.findall(r"(\d+) bytes spill stores", block) or [0])[0])
            smem = int((re.findall(r"(\d+) bytes smem", block) or [0])[0])
            name = names[mangled]
            rows.append(dict(kernel=name, arch=arch, regs=regs, spills=spills, shared=smem))
            if spills and "double" not in name:
                problems.append(f"CUDA {name} {arch}: {spills} B of register spills")
            if smem > CUDA_STATIC_SHARED:
                problems.append(f"CUDA {name} {arch}: {smem} B of static shared memory")
    return rows, problems


def _demangle(entries):
    mangled = sorted({m for m, _ in entries})
    out = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True)
    names = out.stdout.split("\n") if out.returncode == 0 else mangled
    return dict(zip(mangled, names))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ci", action="store_true", help="representative subset (see module docstring)")
    ap.add_argument("--amd", action="store_true", help="also compile for AMD gfx942")
    ap.add_argument("--kernels", nargs="+", metavar="NAME", help="compile only these kernels (all checks "
                    "without a compile still cover every launch)")
    ap.add_argument("--no-cuda", dest="cuda", action="store_false", help="skip the CUDA library's ptxas report")
    ap.add_argument("--out", help="folder for report.json and report.md")
    a = ap.parse_args(argv)
    # an empty Triton cache: every compile runs ptxas, whose log has the registers and spills
    with tempfile.TemporaryDirectory(prefix="tinyrecon-sweep-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        return _sweep(a)


def _sweep(a):
    t0 = time.time()
    errors = capture(cases(a.ci))
    launches = _LAUNCHES
    t1 = time.time()
    pairs = [(x, t) for x, t in select(launches, a.ci, a.amd) if not a.kernels or x.name in a.kernels]
    results, items = compile_all(pairs)
    problems = [f"launcher failed: {e}" for e in errors] + sorted(_KEY_PROBLEMS) + check(results, items, launches)
    t2 = time.time()
    cuda_rows, cuda_problems = cuda_report() if a.cuda else ([], [])
    problems += cuda_problems
    cpu = os.times()   # this process and its finished children (ptxas, nvcc): the machine-independent cost
    summary = dict(launches=len(launches), compiled=len(results), failures=sum(not r.ok for r in results),
                   capture_s=round(t1 - t0, 1), compile_s=round(t2 - t1, 1), cuda_s=round(time.time() - t2, 1),
                   cpu_s=round(cpu.user + cpu.system + cpu.children_user + cpu.children_system),
                   problems=problems, triton=triton.__version__, mode="ci" if a.ci else "full")
    print(json.dumps({k: v for k, v in summary.items() if k != "problems"}))
    for p in problems:
        print("PROBLEM", p)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "report.json"), "w") as f:
            json.dump(dict(summary, results=[r.__dict__ for r in results], cuda=cuda_rows), f, indent=1)
        with open(os.path.join(a.out, "report.md"), "w") as f:
            f.write(_markdown(summary, results, cuda_rows))
    return 1 if problems else 0


def _markdown(summary, results, cuda_rows):
    lines = [f"# Triton AOT compile sweep ({summary['mode']}, triton {summary['triton']})", "",
             f"{summary['compiled']} compiles of {summary['launches']} captured launches, "
             f"{summary['failures']} failures; wall time: capture {summary['capture_s']} s, compile "
             f"{summary['compile_s']} s, CUDA library {summary['cuda_s']} s; CPU time {summary.get('cpu_s')} s.", "",
             "Problems:" if summary["problems"] else "No problems.", ""]
    lines += [f"- {p}" for p in summary["problems"]]
    lines += ["", "| kernel | target | variant | shared B | regs | spill B | mma |", "|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r.kernel, r.target, r.spec)):
        lines.append(f"| {r.kernel} | {r.target} | {r.spec} | {r.shared} | {r.regs} | {r.spills} | "
                     f"{'' if r.mma is None else 'yes' if r.mma else 'no'} |" if r.ok else
                     f"| {r.kernel} | {r.target} | {r.spec} | FAILED: {r.error} | | | |")
    if cuda_rows:
        lines += ["", "## CUDA library (nvcc -Xptxas -v)", "", "| kernel | arch | regs | spill B | static shared B |",
                  "|---|---|---|---|---|"]
        lines += [f"| `{r['kernel']}` | {r['arch']} | {r['regs']} | {r['spills']} | {r['shared']} |" for r in cuda_rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
