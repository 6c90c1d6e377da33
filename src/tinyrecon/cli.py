"""``tinyrecon`` command line: ``bench`` (check and time cases), ``info`` (versions, backends),
``compare`` (two results.json files side by side)."""
from __future__ import annotations

import argparse
import datetime
import sys

import torch

from . import dispatch
from .benchmark import cases, report, runner, timing


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinyrecon", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="check every case against the torch reference, then time it "
                                     "against tinyBIG's algorithm and a dense layer",
                       description="Check every case against the float64 torch reference, then time it "
                                   "interleaved with tinyBIG's algorithm (build W, F.linear) and a dense "
                                   "nn.Linear and one read of x (x.sum(), the floor). Exits with 1 when a "
                                   "case is wrong or fails.")
    b.add_argument("--functions", nargs="+", metavar="NAME",
                   help=f"function or family names (default: all): {', '.join(cases.FUNCTIONS)}; "
                        f"families: {', '.join(cases.FAMILIES)} (hypernet and masking name the function)")
    b.add_argument("--shapes", nargs="+", metavar="NAME",
                   help=f"{', '.join(f'{s.name} (n={s.n}, D={s.D}, batch {s.batch})' for s in cases.SHAPES.values())}; "
                        f"default: {', '.join(cases.QUICK_SHAPES)} + dual_lphm fwdbwd and train on mnist with --quick, "
                        f"all with --full")
    b.add_argument("--backends", nargs="+", metavar="NAME",
                   help=f"{', '.join(dispatch.BACKENDS)} (default: all; those that cannot run are listed as skipped)")
    b.add_argument("--ops", nargs="+", metavar="OP", help=f"{', '.join(cases.OPS)} (default: all)")
    b.add_argument("--dtype", nargs="+", metavar="DTYPE", default=["float32"],
                   help=f"{', '.join(cases.DTYPES)}; several run each case in each, one after the other "
                        "(default: float32)")
    mode = b.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="quick", action="store_true", default=True,
                      help=f"short timings, {', '.join(cases.QUICK_SHAPES)} shapes plus the MNIST headline, "
                           "no cold calls, the cases that take minutes listed as skipped (the default)")
    mode.add_argument("--full", dest="quick", action="store_false",
                      help="longer timings, every shape, cold calls timed")
    b.add_argument("--cold", action=argparse.BooleanOptionalAction,
                   help="time the first call in a fresh process too: the random families' at every shape, "
                        f"every function's at the {cases.COLD_SHAPE} shape (default: on with --full, off with --quick)")
    b.add_argument("--plot", action=argparse.BooleanOptionalAction,
                   help=f"write speedup.png (needs matplotlib: {report.BENCH_EXTRA}; default: when it is installed)")
    b.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    b.add_argument("--out", metavar="DIR",
                   help="folder for results.json, results.md and speedup.png "
                        "(default: bench-results/<device>-<date>)")

    sub.add_parser("info", help="versions, device, and which backends can run (and why not)")

    c = sub.add_parser("compare", help="compare two results.json files case by case")
    c.add_argument("a", metavar="A.json")
    c.add_argument("b", metavar="B.json")
    return p


def _progress(items):
    """A tqdm bar on stderr, or one line per case where tqdm is not installed."""
    if report.missing("tqdm"):
        for i, (case, dtype) in enumerate(items):
            print(f"[{i + 1}/{len(items)}] {case.id} {str(dtype).replace('torch.', '')}", file=sys.stderr, flush=True)
            yield case, dtype
        return
    from tqdm import tqdm
    bar = tqdm(items, file=sys.stderr, unit="case", dynamic_ncols=True)
    for case, dtype in bar:
        bar.set_postfix_str(case.id, refresh=False)
        yield case, dtype


def _bench(args, parser) -> int:
    try:
        selected = cases.select(args.functions, args.shapes, args.backends, args.ops, quick=args.quick)
        dtypes = cases.dtypes(args.dtype)
    except ValueError as e:
        parser.error(str(e))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if args.plot and report.missing("matplotlib"):
        parser.error(f"--plot needs matplotlib: {report.missing('matplotlib')}")
    with_plot = args.plot if args.plot is not None else not report.missing("matplotlib")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = args.out or f"bench-results/{timing.device_tag(device)}-{datetime.date.today().isoformat()}"

    data = runner.run(selected, dtypes, device, quick=args.quick, progress=_progress, cold=args.cold)
    print(report.header(data["meta"]))
    print(report.table(data))
    paths = report.save(data, out, with_plot)
    print(f"\nwrote {', '.join(map(str, paths))}"
          + ("" if with_plot or args.plot is False else f" (no speedup.png: {report.missing('matplotlib')})"))
    return 1 if any(r["status"] in ("wrong", "error") for r in data["results"]) else 0


def _info() -> int:
    v = timing.versions()
    print(f"tinyrecon {v['tinyrecon']}  torch {v['torch']}  triton {v['triton']}  python {v['python']}")
    print(f"cpu: {timing.device_name(torch.device('cpu'))}")
    no_cuda = dispatch.why_not("torch", None, "cuda")
    print(f"cuda: {timing.device_name(torch.device('cuda'))} (CUDA {torch.version.cuda})" if not no_cuda
          else f"cuda: {no_cuda}")
    # Only device types this machine has, and only backends that ever run them.
    for device_type in ("cpu",) + (() if no_cuda else ("cuda",)):
        print(f"backends for {device_type} tensors:")
        for backend, reason in dispatch.available(device_type).items():
            print(f"  {backend:7s} {'available' if not reason else 'no: ' + reason}")
    rates = timing.generator_throughput()
    if rates:
        print("CPU library's Philox, one core: " + ", ".join(f"{k} {v / 1e6:.0f} M numbers/s" for k, v in rates.items()
                                                              if k != "memcpy")
              + f" (memcpy of the same float32 bytes: {rates['memcpy'] / 1e6:.0f} M/s)")
        from . import cpu_lib
        print("CPU library's threads: " + ("torch's OpenMP team" if cpu_lib.torch_openmp() else
                                           "its own, started per call (torch runs without OpenMP here)"))
    return 0


def _compare(args, parser) -> int:
    try:
        a, b = report.load(args.a), report.load(args.b)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    print(f"A: {args.a}: {report.header(a['meta'])}")
    print(f"B: {args.b}: {report.header(b['meta'])}")
    print("B vs A: A's time / B's time (above 1: B is faster)\n")
    print(report.compare_table(report.compare(a, b)))
    return 0


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench(args, parser)
    if args.command == "info":
        return _info()
    return _compare(args, parser)
