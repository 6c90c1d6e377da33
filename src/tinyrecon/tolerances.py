"""Per-dtype tolerances against a float64 (or float32) reference, for the tests and the benchmark: one
rounding of the output plus fp32 accumulation error (atol is scaled by the reference's largest magnitude)."""
import torch

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
