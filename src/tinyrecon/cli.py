"""``tinyrecon`` command line: ``bench`` (check and time cases), ``info`` (versions, backends),
``compare`` (two results.json files side by side)."""
from __future__ import annotations

import argparse
import datetime
import sys

import torch

from . import benchmark as tb
from . import dispatch


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinyrecon", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="check every case against the torch reference, then time it "
                                     "against tinyBIG's algorithm and a dense layer",
                       description="Check every case against the float64 torch reference, then time it "
                                   "interleaved with tinyBIG's algorithm (build W, F.linear) and a dense "
                                   "nn.Linear. Exits with 1 when a case is wrong or fails.")
    b.add_argument("--functions", nargs="+", metavar="NAME",
                   help=f"function or family names (default: all): {', '.join(tb.FUNCTIONS)}; "
                        f"families: {', '.join(tb.FAMILIES)} (hypernet and masking name the function)")
    b.add_argument("--shapes", nargs="+", metavar="NAME",
                   help=f"{', '.join(f'{s.name} (n={s.n}, D={s.D}, batch {s.batch})' for s in tb.SHAPES.values())}; "
                        f"default: {', '.join(tb.QUICK_SHAPES)} + dual_lphm fwdbwd and train on mnist with --quick, all with --full")
    b.add_argument("--backends", nargs="+", metavar="NAME",
                   help=f"{', '.join(dispatch.BACKENDS)} (default: all; those that cannot run are listed as skipped)")
    b.add_argument("--ops", nargs="+", metavar="OP", help=f"{', '.join(tb.OPS)} (default: all)")
    b.add_argument("--dtype", choices=list(tb.DTYPES), default="float32")
    mode = b.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="quick", action="store_true", default=True,
                      help="short timings, small and tall shapes plus the MNIST headline (the default)")
    mode.add_argument("--full", dest="quick", action="store_false",
                      help="longer timings, every shape, slower cases allowed")
    b.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    b.add_argument("--out", metavar="DIR",
                   help="folder for results.json, results.md and speedup.png "
                        "(default: bench-results/<device>-<date>)")

    sub.add_parser("info", help="versions, device, and which backends can run (and why not)")

    c = sub.add_parser("compare", help="compare two results.json files case by case")
    c.add_argument("a", metavar="A.json")
    c.add_argument("b", metavar="B.json")
    return p


def _bench(args, parser) -> int:
    try:
        cases = tb.select(args.functions, args.shapes, args.backends, args.ops, quick=args.quick)
    except ValueError as e:
        parser.error(str(e))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = args.out or f"bench-results/{tb.device_tag(device)}-{datetime.date.today().isoformat()}"

    def progress(items):
        from tqdm import tqdm
        bar = tqdm(items, file=sys.stderr, unit="case", dynamic_ncols=True)
        for case in bar:
            bar.set_postfix_str(case.id, refresh=False)
            yield case

    data = tb.run(cases, tb.DTYPES[args.dtype], device, quick=args.quick, progress=progress)
    print(tb.header(data["meta"]))
    print(tb.table(data))
    path = tb.save(data, out)
    print(f"\nwrote {path / 'results.json'}, {path / 'results.md'}, {path / 'speedup.png'}")
    return 1 if any(r["status"] in ("wrong", "error") for r in data["results"]) else 0


def _info() -> int:
    v = tb.versions()
    print(f"tinyrecon {v['tinyrecon']}  torch {v['torch']}  triton {v['triton']}  python {v['python']}")
    print(f"cpu: {tb.device_name(torch.device('cpu'))}")
    no_cuda = dispatch.why_not("torch", None, "cuda")
    print(f"cuda: {tb.device_name(torch.device('cuda'))} (CUDA {torch.version.cuda})" if not no_cuda
          else f"cuda: {no_cuda}")
    # Only device types this machine has, and only backends that ever run them.
    for device_type in ("cpu",) + (() if no_cuda else ("cuda",)):
        print(f"backends for {device_type} tensors:")
        for backend, reason in dispatch.available(device_type).items():
            print(f"  {backend:7s} {'available' if not reason else 'no: ' + reason}")
    rates = tb.generator_throughput()
    if rates:
        print("CPU library's Philox, one core: " + ", ".join(f"{k} {v / 1e6:.0f} M numbers/s" for k, v in rates.items()
                                                              if k != "memcpy")
              + f" (memcpy of the same float32 bytes: {rates['memcpy'] / 1e6:.0f} M/s)")
    return 0


def _compare(args, parser) -> int:
    try:
        a, b = tb.load(args.a), tb.load(args.b)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    print(f"A: {args.a}: {tb.header(a['meta'])}")
    print(f"B: {args.b}: {tb.header(b['meta'])}")
    print("B vs A: A's time / B's time (above 1: B is faster)\n")
    print(tb.compare_table(tb.compare(a, b)))
    return 0


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench(args, parser)
    if args.command == "info":
        return _info()
    return _compare(args, parser)
