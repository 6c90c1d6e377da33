"""A small CUDA-library workload for compute-sanitizer (bench/gpu_check.sh): every op of the CUDA
backend, forward and backward, on small odd shapes in fp32 and fp16, so memcheck and racecheck see
every kernel's edges in seconds."""
import torch

import tinyrecon as tr

CASES = [("hm", dict(p=2, q=3), 6, 15), ("lphm", dict(p=2, q=3, r=2), 6, 15),
         ("dual_lphm", dict(p=3, q=5, r=2), 9, 35), ("duplicated_diagonal_padding", dict(p=2, q=3), 6, 15),
         ("lorr", dict(r=3), 7, 33)]


def main():
    torch.manual_seed(0)
    for name, kwargs, n, D in CASES:
        rec = tr.reconciliation(name, **kwargs)
        for dtype in (torch.float32, torch.float16):
            w = torch.randn(2, rec.calculate_l(n, D), device="cuda", dtype=dtype, requires_grad=True)
            x = torch.randn(5, D, device="cuda", dtype=dtype, requires_grad=True)
            b = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
            rec.apply(x, w, n=n, bias=b, backend="cuda").sum().backward()
            rec(n=n, D=D, w=w, backend="cuda").sum().backward()
            torch.cuda.synchronize()
            print(f"{name} {dtype}: ok", flush=True)


if __name__ == "__main__":
    main()
