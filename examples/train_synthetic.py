"""Train ReconciledLinear layers on a synthetic regression task, next to a dense nn.Linear.

    python examples/train_synthetic.py            # full size: m=32, D=1056, n=64, 500 steps
    python examples/train_synthetic.py --smoke    # a few seconds (what tests/test_example.py runs)

Each input x (m features) goes through a second-order Taylor expansion, as in an RPN head:
kappa(x) = [x, vec(x x^T)], so the one linear layer on kappa(x) has D = m + m^2 inputs, the
wide layer parameter reconciliation exists for. The target is a fixed quadratic function of a
few directions of x, y = (z + z^2 - 1) V with z = x U (k columns), so a dense layer on kappa(x)
can fit it exactly and a compressed one as far as its structure allows. Every step draws a
fresh batch (no downloads, no overfitting); Adam with a cosine learning-rate decay. Losses are
mean squared errors relative to var(y) on a held-out batch: 1.0 is "predict zero", 0 is
perfect. The script exits with status 1 when a layer's loss does not go down, or when the
unstructured ones (dense, identity) do not fit the target. Every layer starts at nn.Linear's
output scale (ReconciledLinear's default init="linear"), so every loss@0 is near the dense
layer's; the two frozen-random hypernets (tinyBIG's definitions) then learn little: their W is
a fixed random matrix times a vector that w only partly controls.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import tinyrecon as tr

SIZES = {"smoke": dict(m=8, n=8, k=2, steps=300, batch=64), "full": dict(m=32, n=64, k=4, steps=500, batch=256)}
UNSTRUCTURED = ("dense nn.Linear", "identity")


def taylor(x: torch.Tensor) -> torch.Tensor:
    """Second-order Taylor expansion [x, vec(x x^T)]: (N, m) -> (N, m + m^2)."""
    return torch.cat([x, (x[:, :, None] * x[:, None, :]).flatten(1)], dim=1)


def families(n: int, D: int) -> dict:
    """One layer per reconciliation family (short names as in tinyrecon.reconciliation)."""
    h = dict(l=64, hidden_dim=32)
    specs = {
        "identity": tr.identity_reconciliation(),
        "lorr(r=2)": tr.lorr_reconciliation(r=2),
        "hm": tr.hm_reconciliation(),
        "lphm(r=2)": tr.lphm_reconciliation(r=2),
        "dual_lphm(r=2)": tr.dual_lphm_reconciliation(r=2),
        "duplicated_padding(p=2)": tr.duplicated_padding_reconciliation(p=2),
        "masking(p=0.5)": tr.masking_reconciliation(p=0.5),
        "random_matrix_adaption(r=4)": tr.random_matrix_adaption_reconciliation(r=4),
        "hypernet(l=64)": tr.hypernet_reconciliation(**h),
        "random_matrix_hypernet(l=64)": tr.random_matrix_hypernet_reconciliation(r=2, **h),
    }
    layers = {"dense nn.Linear": nn.Linear(D, n)}
    layers.update({name: tr.ReconciledLinear(D, n, rec) for name, rec in specs.items()})
    return layers


def train(layer: nn.Module, teacher, m: int, steps: int, batch: int, lr: float, gen: torch.Generator):
    """(relative test loss before, after, mean seconds per step)."""
    x_test = torch.randn(1024, m, generator=gen)
    k_test, y_test = taylor(x_test), teacher(x_test)

    def test_loss():
        with torch.no_grad():
            return (nn.functional.mse_loss(layer(k_test), y_test) / y_test.var()).item()

    before = test_loss()
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    elapsed, warmup = 0.0, min(5, steps // 2)
    for step in range(steps):
        x = torch.randn(batch, m, generator=gen)
        k, y = taylor(x), teacher(x)
        t0 = time.perf_counter()   # the layer's forward, backward and update only
        loss = nn.functional.mse_loss(layer(k), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step >= warmup:
            elapsed += time.perf_counter() - t0
    return before, test_loss(), elapsed / (steps - warmup)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    ap.add_argument("--steps", type=int, help="override the number of training steps")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    size = SIZES["smoke" if args.smoke else "full"]
    m, n, k, batch = size["m"], size["n"], size["k"], size["batch"]
    steps = args.steps or size["steps"]
    D = m + m * m

    torch.manual_seed(args.seed)
    U, V = torch.randn(m, k) / m ** 0.5, torch.randn(k, n) / k ** 0.5

    def teacher(x):
        z = x @ U
        return (z + z * z - 1) @ V

    print(f"synthetic regression: m={m} -> Taylor order 2 -> D={D}, n={n}; {steps} steps, batch {batch}, "
          f"Adam lr={args.lr}, {torch.get_num_threads()} CPU thread(s)")
    print(f"{'layer':30s} {'params':>8s} {'n*D/params':>10s} {'loss@0':>8s} {'loss@end':>8s} {'ms/step':>8s}")
    failed = []
    for name, layer in families(n, D).items():
        params = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        before, after, sec = train(layer, teacher, m, steps, batch, args.lr, torch.Generator().manual_seed(args.seed))
        print(f"{name:30s} {params:8d} {n * D / params:10.1f} {before:8.3f} {after:8.3f} {sec * 1e3:8.2f}")
        if not after < before or (name in UNSTRUCTURED and not after < 0.05):
            failed.append(name)
    if failed:
        print(f"did not converge: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
