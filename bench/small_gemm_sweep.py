"""Where the CPU library's own GEMMs stop beating torch's in the fused small-W training step
(``cpu_ops._SMALL_GEMM``): one hm step (grads of w and bias) with y, dW and the bias gradient in the
library against the same step with them in torch, at growing N*n*D, thread clock, one torch thread,
interleaved rounds.
Prints library / torch (< 1: the library's loops are faster).

    python bench/small_gemm_sweep.py
"""
import torch
from tiny_overhead import time_thread

import tinyrecon as tr
from tinyrecon import cpu_ops
from tinyrecon.benchmark import check


def main():
    torch.set_num_threads(1)
    keep = cpu_ops._SMALL_GEMM
    try:
        for n, D, kwargs in ((6, 12, dict(p=2, q=3)), (32, 64, dict(p=4, q=8))):
            rec = tr.hm_reconciliation(**kwargs)
            w = torch.randn(rec.calculate_l(n, D), requires_grad=True)
            b = torch.randn(n, requires_grad=True)
            plan = cpu_ops.small_linear(rec, n, D, w)
            for N in (16, 64, 256, 1024, 4096):
                x, g = torch.randn(N, D), torch.randn(N, n)
                def step(limit):
                    def run():
                        cpu_ops._SMALL_GEMM = limit
                        return check.step_grads(cpu_ops._SmallLinear.apply(x, w, b, plan), (w, b), g)
                    return run
                t = time_thread({"library": step(1 << 62), "torch": step(-1)}, calls=100)
                print(f"n={n} D={D} N={N} N*n*D={N * n * D}: library {t['library'] * 1e6:.1f} us, "
                      f"torch {t['torch'] * 1e6:.1f} us, library/torch {t['library'] / t['torch']:.2f}")
    finally:
        cpu_ops._SMALL_GEMM = keep


if __name__ == "__main__":
    main()
