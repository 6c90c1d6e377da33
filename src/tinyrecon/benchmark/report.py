"""Reporting: tables (text or markdown), a plot, results.json saved and loaded, two runs compared."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from .cases import OPS

BENCH_EXTRA = "pip install 'tinyrecon[bench]'"


def missing(module: str) -> str:
    """'' if ``module`` (an optional dependency of the benchmark) is installed, else what to install."""
    return "" if importlib.util.find_spec(module) else f"{module} is not installed ({BENCH_EXTRA})"


def _fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}"


def table(data: dict, markdown: bool = False) -> str:
    """The results as a table (plain text, or markdown), skipped cases listed below it by reason."""
    gpu = data["meta"]["device_type"] == "cuda"
    several = len({r["dtype"] for r in data["results"]}) > 1
    head = ["function", "shape", "op", "backend"] + ["dtype"] * several
    keys = len(head)
    head += ["ms", "ms / floor", "x vs tinyBIG", "x vs dense", "cold ms", "cold / warm", "cold x vs tinyBIG"]
    head += ["GB/s", "TFLOP/s", "% copy"] if gpu else []
    rows, skipped = [], {}
    for r in data["results"]:
        if r["status"] == "skipped":
            skipped.setdefault(r["reason"], []).append(r)
            continue
        if r["status"] == "ok":
            cold = r.get("cold_ms")
            cells = [_fmt(r["ms"]), _fmt(r.get("over_floor")), _fmt(r["x_tinybig"]), _fmt(r["x_dense"]),
                     _fmt(cold), _fmt(cold and cold / r["ms"]), _fmt(cold and r["cold_ms_tinybig"] / cold)]
            cells += [_fmt(r["gbps"]), _fmt(r["tflops"]), _fmt(r["pct_copy"])] if gpu else []
        else:
            cells = [r["status"].upper() + ": " + r["reason"]] + [""] * (len(head) - keys - 1)
        rows.append([r["function"], r["shape"], r["op"], r["backend"]] + [r["dtype"]] * several + cells)
    lines = []
    if markdown:
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    else:
        widths = [max(len(str(c)) for c in col) for col in zip(head, *[row[:len(head)] for row in rows])]
        for row in [head, *rows]:
            lines.append("  ".join(str(c).ljust(wd) for c, wd in zip(row, widths)).rstrip())
    if skipped:
        lines += ["", f"skipped ({sum(map(len, skipped.values()))} cases):"]
        ran = {}   # function -> the shapes it was asked for
        for r in data["results"]:
            ran.setdefault(r["function"], {})[r["shape"]] = None
        for reason, rs in skipped.items():
            shapes = {}
            for r in rs:
                shapes.setdefault(r["function"], {})[r["shape"]] = None
            where = ", ".join(f if list(s) == list(ran[f]) else f"{f} ({', '.join(s)})" for f, s in shapes.items())
            lines.append(f"{'- ' if markdown else '  '}{reason} ({len(rs)} case{'s' * (len(rs) > 1)}): {where}")
    return "\n".join(lines)


def header(meta: dict) -> str:
    interp = " | Triton interpreter: its timings mean nothing" if meta.get("triton_interpret") else ""
    load = meta.get("load_avg") or [None]
    busy = f" | load average {load[0]:.1f} -> {load[-1]:.1f}" if None not in load else ""
    cold = ", cold calls timed" if meta.get("cold") else ""
    return (f"{meta['date']} | {meta['device']} | torch {meta['torch']}, triton {meta['triton']}, "
            f"tinyrecon {meta['tinyrecon']} | {meta['dtype']}, {meta['mode']} mode{cold}{busy}{interp}")


def plot(data: dict, path) -> None:
    """Speedup vs tinyBIG's algorithm per function and backend, one panel per op; needs matplotlib."""
    if missing("matplotlib"):
        raise ImportError(f"the plot needs matplotlib: {missing('matplotlib')}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in data["results"] if r["status"] == "ok"]
    several = len({r["dtype"] for r in ok}) > 1
    ops = [op for op in OPS if any(r["op"] == op for r in ok)] or ["fwd"]
    fig, axes = plt.subplots(len(ops), 1, figsize=(12, 3.2 * len(ops) + 0.8), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        rows = [r for r in ok if r["op"] == op]
        funcs = list(dict.fromkeys(r["function"] for r in rows))
        series = list(dict.fromkeys((r["shape"], r["backend"], r["dtype"]) for r in rows))
        width = 0.8 / max(1, len(series))
        for k, (shape, backend, dtype) in enumerate(series):
            xs, ys = [], []
            for i, f in enumerate(funcs):
                for r in rows:
                    if (r["function"], r["shape"], r["backend"], r["dtype"]) == (f, shape, backend, dtype):
                        xs.append(i + (k - (len(series) - 1) / 2) * width)
                        ys.append(r["x_tinybig"])
            # bars grow from 1 (no change): up for speedups, down for slowdowns
            label = f"{shape} / {backend}" + f" / {dtype}" * several
            ax.bar(xs, [y - 1 for y in ys], width, bottom=1, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylabel(f"{op}: x vs tinyBIG")
        ax.set_xticks(range(len(funcs)))
        ax.set_xticklabels(funcs, rotation=20, ha="right", fontsize=8)
        if series:
            ax.legend(fontsize=7, ncol=min(4, len(series)))
        else:
            ax.text(0.5, 0.5, "no timed cases", ha="center", transform=ax.transAxes)
    fig.suptitle("speedup vs tinyBIG's algorithm (build W, then F.linear)\n" + header(data["meta"]), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(data: dict, out_dir, with_plot: bool = True) -> list[Path]:
    """Write results.json, results.md and (``with_plot``) speedup.png into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md"]
    paths[0].write_text(json.dumps(data, indent=1) + "\n")
    paths[1].write_text(f"{header(data['meta'])}\n\n{table(data, markdown=True)}\n")
    if with_plot:
        plot(data, out / "speedup.png")
        paths.append(out / "speedup.png")
    return paths


def load(path) -> dict:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "meta" not in data or "results" not in data:
        raise ValueError(f"{path} is not a tinyrecon bench results.json (needs 'meta' and 'results')")
    return data


def compare(a: dict, b: dict) -> list[dict]:
    """Per case present in either run: ms in A and B and B's speedup over A (A ms / B ms)."""
    def key(r):
        return (r["function"], r["shape"], r["op"], r["backend"], r["dtype"])
    ra, rb = {key(r): r for r in a["results"]}, {key(r): r for r in b["results"]}
    rows = []
    for k in list(ra) + [k for k in rb if k not in ra]:
        x, y = ra.get(k), rb.get(k)
        ms_a, ms_b = x and x["ms"], y and y["ms"]
        rows.append(dict(zip(("function", "shape", "op", "backend", "dtype"), k), ms_a=ms_a, ms_b=ms_b,
                         speedup=ms_a / ms_b if ms_a and ms_b else None,
                         status_a=x["status"] if x else "absent", status_b=y["status"] if y else "absent"))
    return rows


def compare_table(rows: list[dict]) -> str:
    """The rows of :func:`compare` as text; cases timed in neither run with nothing new to say are counted."""
    head = ["function", "shape", "op", "backend", "dtype", "A ms", "B ms", "B vs A"]
    body = []
    same = [r for r in rows if r["status_a"] == r["status_b"] != "ok"
            or {r["status_a"], r["status_b"]} <= {"skipped", "absent"}]
    for r in rows:
        if r in same:
            continue
        note = (f"{_fmt(r['speedup'])}x" if r["speedup"] else f"{r['status_a']} -> {r['status_b']}")
        body.append([r["function"], r["shape"], r["op"], r["backend"], r["dtype"], _fmt(r["ms_a"]),
                     _fmt(r["ms_b"]), note])
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    lines = ["  ".join(c.ljust(wd) for c, wd in zip(row, widths)).rstrip() for row in [head, *body]]
    return "\n".join(lines + ([f"({len(same)} cases timed in neither run not shown)"] if same else []))
