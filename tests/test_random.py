"""The torch Philox equals Triton's tl.rand bit for bit (and tl.randn to libm rounding)."""
import pytest
import torch

from tinyrecon import _random

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from conftest import DEVICE  # noqa: E402


@triton.jit
def _draw(U, Z, N, seed, start, BLOCK: tl.constexpr):
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = off < N
    tl.store(U + off, tl.rand(seed, start + off), mask=mask)
    tl.store(Z + off, tl.randn(seed, start + off), mask=mask)


@pytest.mark.parametrize("seed", [0, 1, 2**32 + 7, 2**62 + 5, _random.derive_seed(123, 4)])
@pytest.mark.parametrize("start", [0, 2**31 - 5, 2**33 + 3])   # offsets past int32 use the high counter word
def test_matches_triton(seed, start):
    n = 777
    u = torch.empty(n, device=DEVICE)
    z = torch.empty(n, device=DEVICE)
    _draw[(triton.cdiv(n, 256),)](u, z, n, seed, start, BLOCK=256)
    assert torch.equal(u, _random.rand(seed, (n,), device=DEVICE, start=start))
    torch.testing.assert_close(z, _random.randn(seed, (n,), device=DEVICE, start=start), rtol=0, atol=2e-6)


def test_distribution_and_slicing():
    z = _random.randn(5, (200_000,))
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    u = _random.rand(5, (200_000,))
    assert 0 <= u.min().item() and u.max().item() < 1 and abs(u.mean().item() - 0.5) < 0.005
    assert torch.equal(_random.randn(5, (10, 7))[3:], _random.randn(5, (7, 7), start=21))


def test_derived_seeds_differ_and_fit_int64():
    seeds = {_random.derive_seed(s, k) for s in range(50) for k in range(4)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)


def test_cache_hands_out_private_copies_of_the_same_values():
    first = _random.randn(9, (4, 3))
    expected = first.clone()
    first.add_(1.0)   # a caller mutating its copy must not change what others get
    again = _random.randn(9, (4, 3))
    assert torch.equal(again, expected)
    assert torch.equal(again.flatten(), _random._fill(9, 0, 12, None, "randn"))


def test_shared_draws_are_the_cached_plain_tensor():
    """``shared=True`` returns the cache's tensor itself (no copy), a plain tensor even when drawn
    under torch.inference_mode(); the default is a fresh copy of the same values."""
    _random.clear_cache()
    with torch.inference_mode():
        first = _random.randn(19, (40, 3), shared=True)
    assert not first.is_inference()
    again = _random.randn(19, (40, 3), shared=True)
    assert again.data_ptr() == first.data_ptr()
    own = _random.randn(19, (40, 3))
    assert own.data_ptr() != first.data_ptr() and torch.equal(own, first)
