"""Accuracy against compression for every reconciliation function, on scikit-learn's 8x8 digits.

    python examples/digits_rpn.py            # full: 64 pixels, hidden width 64, 3 seeds (10-15 min on 2 busy cores)
    python examples/digits_rpn.py --smoke    # seconds: 4x4 pooled pixels, 1 seed (tests/test_example.py)

Needs scikit-learn (`pip install tinyrecon[examples]`) for `load_digits` (1,797 images bundled with
it, no download). A two-layer RPN-style classifier: each layer expands its input with the
second-order Taylor terms, as tinyBIG's MNIST RPN does, layer-normalised to keep the products in
range, kappa(x) = layer_norm([x, vec(x x^T)]), and maps it with one ReconciledLinear:

    h = L1(kappa(pixels / 16))     D = 64 + 64^2 = 4160 -> n = 64
    logits = L2(kappa(h))          D = 4160             -> n = 10

The same model is trained with each of the 15 functions in both layers (tinyBIG's default
arguments, valid at both shapes; hypernet with a smaller hidden_dim, see ARGS) and with dense
nn.Linear layers: same split, optimizer, epochs and seeds. Writes results.md, results.json and
accuracy.png (test accuracy against trainable parameters) to --out. Exits with status 1 when the
dense baseline does not learn the task.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import tinyrecon as tr
from tinyrecon.registry import CLASSES

SIZES = {"smoke": dict(pool=2, hidden=16, epochs=3, seeds=1),
         "full": dict(pool=1, hidden=64, epochs=30, seeds=3)}
# hypernet's default hidden_dim=128 makes its frozen matrix n*D x 128 (34M numbers at layer 1),
# which the torch path regenerates on every forward (minutes per step on CPU); 16 stays cached.
ARGS = {"hypernet": dict(hidden_dim=16)}
# Why a function's structure caps its accuracy here (with these arguments).
LIMITS = {"duplicated_padding": "ones(2, 2) kron B repeats each output: classes c and c+5 get equal logits",
          "lorr": "rank 2 (r=2) in both layers",
          "lphm": "S@T of rank 2 (r=2)",
          "dual_lphm": "P@Q and S@T of rank 2 (r=2)",
          "random_matrix_adaption": "rank 2 through frozen random A, B; only n + r scales train"}
BASELINE = {"smoke": 0.8, "full": 0.95}   # dense test accuracy below this means something broke


def kappa(x: torch.Tensor) -> torch.Tensor:
    """Layer-normalised second-order Taylor expansion: (N, m) -> (N, m + m^2)."""
    k = torch.cat([x, (x[:, :, None] * x[:, None, :]).flatten(1)], dim=1)
    return F.layer_norm(k, k.shape[1:])


class RPN(nn.Module):
    def __init__(self, m: int, hidden: int, classes: int, function: str | None):
        super().__init__()
        def linear(D, n):   # a fresh function instance per layer (each draws its own seeds)
            if function is None:
                return nn.Linear(D, n)
            return tr.ReconciledLinear(D, n, tr.reconciliation(function, **ARGS.get(function, {})))

        self.layers = nn.ModuleList([linear(m + m * m, hidden), linear(hidden + hidden * hidden, classes)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(kappa(x))
        return x


def load(pool: int, seed: int = 0):
    """Pixels scaled to [0, 1] (optionally average-pooled), split 75/25, stratified, with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32).view(-1, 1, 8, 8) / 16
    X = F.avg_pool2d(X, pool).flatten(1)
    Xtr, Xte, ytr, yte = train_test_split(X.numpy(), y, test_size=0.25, stratify=y, random_state=seed)
    return [torch.as_tensor(a) for a in (Xtr, Xte, ytr, yte)]


def train(model, data, epochs: int, seed: int, batch: int = 64, lr: float = 3e-3):
    """(test accuracy, mean seconds per training epoch)."""
    Xtr, Xte, ytr, yte = data
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    model(Xtr[:batch])   # untimed: frozen random matrices are generated (and cached) on first use
    seconds = 0.0
    for _ in range(epochs):
        t0 = time.perf_counter()
        for idx in torch.randperm(len(Xtr), generator=gen).split(batch):
            loss = F.cross_entropy(model(Xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        seconds += time.perf_counter() - t0
    with torch.no_grad():
        return (model(Xte).argmax(1) == yte).float().mean().item(), seconds / epochs


def run(function: str | None, data, size: dict) -> dict:
    m, accs, secs = data[0].shape[1], [], []
    for seed in range(size["seeds"]):
        torch.manual_seed(seed)   # initial w and the seeds of frozen random matrices
        model = RPN(m, size["hidden"], 10, function)
        if seed == 0:
            torch.manual_seed(0)
            dense = nn.Linear(m + m * m, size["hidden"])
            with torch.no_grad():   # layer 1's output scale at initialisation, relative to nn.Linear's
                k = kappa(data[0][:256])
                scale = (model.layers[0](k).std() / dense(k).std()).item()
        acc, sec = train(model, data, size["epochs"], seed)
        accs.append(acc)
        secs.append(sec)
    layers = list(model.layers)
    nD = sum(layer.in_features * layer.out_features for layer in layers)
    l = sum(getattr(layer, "l", layer.in_features * layer.out_features) for layer in layers)
    return {"function": function or "dense nn.Linear",
            "args": ", ".join(f"{k}={v}" for k, v in ARGS.get(function, {}).items()),
            "l": [getattr(layer, "l", None) for layer in layers],
            "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "compression": nD / l if l else None,   # None: l = 0, nothing to compress
            "sec_per_epoch": statistics.mean(secs), "init_scale": scale, "accs": accs,
            "acc_mean": statistics.mean(accs), "acc_std": statistics.pstdev(accs)}


def note(r: dict) -> str:
    if r["function"] == "dense nn.Linear":
        return "baseline"
    if r["l"] == [0, 0]:
        return "l = 0: W is fixed, only the biases train"
    notes = ["l = n*D: no saving"] if r["compression"] == 1 and r["function"] != "identity" else []
    notes += [LIMITS[r["function"]]] if r["function"] in LIMITS else []
    if not 0.1 < r["init_scale"] < 10:
        notes.append(f"starts {r['init_scale']:.0f}x nn.Linear's output scale")
    return "; ".join(notes)


def ratio(r: dict) -> str:
    return "inf" if r["compression"] is None else f"{r['compression']:.3g}"


def table(rows: list[dict]) -> str:
    head = ["function", "params", "l (layer 1, 2)", "n*D/l", "s/epoch", "test accuracy", "init scale", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        name = r["function"] + (f" ({r['args']})" if r["args"] else "")
        l = ", ".join("-" if v is None else str(v) for v in r["l"])
        lines.append(f"| {name} | {r['params']} | {l} | {ratio(r)} | {r['sec_per_epoch']:.3f} | "
                     f"{100 * r['acc_mean']:.1f} ± {100 * r['acc_std']:.1f} % | {r['init_scale']:.3g} | {note(r)} |")
    return "\n".join(lines)


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    groups = []   # nearby points share one label: [params, accuracy %, names]
    for r in rows:
        dense = r["function"] == "dense nn.Linear"
        x, y = r["params"], 100 * r["acc_mean"]
        ax.errorbar(x, y, yerr=100 * r["acc_std"], fmt="s" if dense else "o", color="black" if dense else "tab:blue",
                    markersize=8 if dense else 6, capsize=3, zorder=3 if dense else 2)
        near = [g for g in groups if abs(math.log(x / g[0])) < 0.4 and abs(y - g[1]) < 3]
        near[0][2].append(r["function"]) if near else groups.append([x, y, [r["function"]]])
    for x, y, names in groups:
        # labels of the rightmost points go left; the baseline's and those below chance go below
        right, below = x > 3e4, y < 10 or "dense nn.Linear" in names
        ax.annotate(", ".join(names), (x, y), textcoords="offset points",
                    xytext=(-6 if right else 6, -12 if below else 4), ha="right" if right else "left", fontsize=7)
    ax.axhline(10, color="grey", linestyle=":", linewidth=1)
    ax.text(ax.get_xlim()[0], 11, " chance", color="grey", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 1 seed, a few seconds")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "digits")
    args = ap.parse_args(argv)
    mode = "smoke" if args.smoke else "full"
    size = SIZES[mode]
    data = load(size["pool"])
    m = data[0].shape[1]
    title = (f"sklearn digits, {m} pixels -> {size['hidden']} -> 10, Taylor order 2 per layer (D = {m + m * m}); "
             f"Adam, {size['epochs']} epochs, {size['seeds']} seed(s), {torch.get_num_threads()} CPU thread(s)")
    print(title)
    rows = []
    for function in [None, *CLASSES]:
        rows.append(run(function, data, size))
        r = rows[-1]
        print(f"{r['function']:30s} {r['params']:8d} params  {ratio(r):>8s} x  {r['sec_per_epoch']:7.3f} s/epoch  "
              f"{100 * r['acc_mean']:5.1f} ± {100 * r['acc_std']:.1f} %  {note(r)}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"title": title, "mode": mode, **size, "torch": torch.__version__, "tinyrecon": tr.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    (args.out / "results.md").write_text(f"{meta['date']}: {title}\n\n{table(rows)}\n")
    plot(rows, title, args.out / "accuracy.png")
    print(f"wrote {args.out}/results.md, results.json, accuracy.png")
    return 0 if rows[0]["acc_mean"] >= BASELINE[mode] else 1


if __name__ == "__main__":
    raise SystemExit(main())
