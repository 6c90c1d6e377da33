"""The CPU library's Philox (csrc/random_cpu.cpp) equals _random.py's torch ops: uniforms bit for
bit, normals to float32 rounding (both evaluate Box-Muller in float64 and round once)."""
import subprocess

import build_libs
import pytest
import torch

from tinyrecon import _clib, _random, cpu_lib

from conftest import assert_close, isa_levels

pytestmark = pytest.mark.skipif(bool(cpu_lib.load_error()), reason="no CPU library here")

SEEDS = [0, 1, 2**32, 2**32 + 1, 2**62 + 5, 2**63 - 1, _random.derive_seed(123, 4)]   # incl. high bits only
STARTS = [0, 13, 2**31 - 5, 2**32 - 7, 2**33 + 3, 2**40 + 1]   # counters past int32, carries into the high word


def _library(seed, start, numel, kind, threads=2):
    out = torch.empty(numel)
    cpu_lib.call("tinyrecon_cpu_philox_fill", kind, threads, seed, start, 1, numel, numel, out.data_ptr() if numel else None)
    return out


def _definition(seed, start, numel, kind):
    return _random._torch_fill(torch.empty(numel), seed, start, numel, ("rand", "randn")[kind])


def _ulps(a, b):
    """Distance in float32 ulps (the ordered integer images of the bits)."""
    ia, ib = (t.view(torch.int32).long() for t in (a, b))
    ia, ib = (torch.where(i < 0, -(i & 0x7FFFFFFF), i) for i in (ia, ib))
    return (ia - ib).abs().max().item() if a.numel() else 0


def _check(seed, start, numel, threads=2):
    u = _library(seed, start, numel, 0, threads)
    assert torch.equal(u.view(torch.int32), _definition(seed, start, numel, 0).view(torch.int32))
    assert _ulps(_library(seed, start, numel, 1, threads), _definition(seed, start, numel, 1)) <= 1


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("start", STARTS)
def test_library_equals_the_definition(seed, start):
    _check(seed, start, 4099)   # a short last block


def test_every_length_and_thread_split(runtime):
    # the generator's steps: 32 counters, then 16, then 8, then a short one; counters cross 2**32 in a step
    for numel in (0, 1, 7, 8, 15, 16, 17, 24, 31, 32, 33, 40, 48, 56, 63, 64, 65, 95):
        _check(7, 2**32 - 9, numel)
    _check(11, 5, (1 << 17) + 3, threads=3)   # big enough to be split over threads


def test_many_normals_round_alike():
    """4M normals: the polynomials' log and cos round as torch's float64 ones (the tails included)."""
    a, b = _library(3, 2**31, 1 << 22, 1), _definition(3, 2**31, 1 << 22, 1)
    assert _ulps(a, b) <= 1 and (a != b).sum().item() <= 4


def test_rand_and_randn_use_the_library():
    calls = []
    real = cpu_lib.call
    try:
        cpu_lib.call = lambda name, *a: calls.append(name) or real(name, *a)
        z = _random._fill(5, 2**33, 100, "cpu", "randn")
    finally:
        cpu_lib.call = real
    assert calls == ["tinyrecon_cpu_philox_fill"]
    assert torch.equal(z, _definition(5, 2**33, 100, 1))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        cpu_lib.call("tinyrecon_cpu_philox_fill", 2, 1, 0, 0, 1, 4, 4, torch.empty(4).data_ptr())
    with pytest.raises(ValueError):
        cpu_lib.call("tinyrecon_cpu_philox_fill", 0, 1, 0, -1, 1, 4, 4, torch.empty(4).data_ptr())


@pytest.mark.parametrize("march", isa_levels())
def test_each_isa_level_builds_clean_and_agrees(march, tmp_path, monkeypatch):
    out = str(tmp_path / f"lib-{march}.so")
    command = build_libs.cxx_command("g++", ["csrc/random_cpu.cpp", "csrc/threads_cpu.cpp"], out, werror=True) + ["-DTR_NO_CLONES", f"-march={march}"]
    root = __file__.rsplit("/tests/", 1)[0]
    assert subprocess.run(command, cwd=root).returncode == 0
    lib = _clib.open_library(out)   # typed by the list the library carries
    fn = lib.tinyrecon_cpu_philox_fill
    for kind in (0, 1):
        for seed, start in ((2**32 + 1, 2**32 - 7), (_random.derive_seed(1, 2), 0)):
            got = torch.empty(1001)
            assert fn(kind, 2, seed, start, 1, got.numel(), got.numel(), got.data_ptr()) == 0
            assert _ulps(got, _definition(seed, start, got.numel(), kind)) <= kind
    mask = lib.tinyrecon_cpu_philox_mask   # masking's pass: a column block of src * (u < p)
    src, got = torch.randn(3, 50), torch.empty(3, 21)
    assert mask(2, 7, 4, 3, 21, 50, 0.3, src[:, 4:].data_ptr(), 50, got.data_ptr(), 21) == 0
    u = _definition(7, 0, 150, 0).view(3, 50)
    assert torch.equal(got, src[:, 4:25] * (u[:, 4:25] < 0.3).float())
    bits = torch.empty(3, 1, dtype=torch.int64)   # the packed mask, and masking's forward GEMM reading it
    assert lib.tinyrecon_cpu_mask_bits(2, 7, 3, 50, 0.3, bits.data_ptr()) == 0
    x, y = torch.randn(5, 50), torch.empty(5, 3)
    assert lib.tinyrecon_cpu_masked_gemm(0, 2, bits.data_ptr(), 1, 0, 5, 3, 50, x.data_ptr(), 50, src.data_ptr(), 50,
                                         None, y.data_ptr(), 3, 0) == 0
    assert_close(y, x.double() @ (src * (u < 0.3).float()).double().T, dtype=torch.float32)
    gemm = lib.tinyrecon_cpu_random_gemm   # the hypernets' fused GEMMs, M and b drawn in the kernel
    v, x, g = torch.randn(1, 3), torch.randn(5, 70), torch.randn(1, 5, 4)
    W, M = _linear_reference(v, 11, 7, 4, 70)
    y, dx, dv = torch.empty(1, 5, 4), torch.empty(5, 70), torch.zeros(1, 3)
    assert gemm(0, 2, 11, 1, 7, 5, 4, 70, 3, 1, v.data_ptr(), x.data_ptr(), 70, None, y.data_ptr(), 0, None, None,
                None) == 0
    assert gemm(1, 2, 11, 1, 7, 5, 4, 70, 3, 1, v.data_ptr(), x.data_ptr(), 70, g.data_ptr(), dx.data_ptr(), 70,
                dv.data_ptr(), None, None) == 0
    assert_close(y[0], x.double() @ W[0].T, dtype=torch.float32)
    assert_close(dx, g[0].double() @ W[0], dtype=torch.float32)
    assert_close(dv[0], torch.einsum("bi,bj,ijq->q", g[0].double(), x.double(), M), dtype=torch.float32)


@pytest.mark.parametrize("kind", ["rand", "randn"])
def test_block_is_a_column_block_of_the_matrix(kind):
    """block(): rows of a wider matrix, each a run of counters (the tiles the applies generate)."""
    seed, start, rows, D = 2**40 + 3, 2**32 - 50, 5, 37
    whole = _definition(seed, start, rows * D, ("rand", "randn").index(kind)).view(rows, D)
    for j0, j1 in ((0, 37), (3, 20), (36, 37), (5, 5)):
        got = _random.block(seed, start + j0, rows, j1 - j0, D, kind)
        assert _ulps(got, whole[:, j0:j1].contiguous()) <= (kind == "randn")


@pytest.mark.parametrize("budget", [None, 0])   # frozen matrices from the cache, or drawn in the kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])   # masking: the library's pass, torch's
@pytest.mark.parametrize("family", ["masking", "rmh", "hypernet"])
def test_applies_over_many_column_blocks(family, dtype, budget, monkeypatch):
    """The cpu applies generate W by column blocks: with blocks of a few columns (odd D, so the last
    block is short) values and gradients equal the reference's, which builds W whole; with the
    cache (masks bit-packed, M kept) and without it (everything drawn where it is used)."""
    import tinyrecon as tr
    from tinyrecon import cpu_ops
    monkeypatch.setattr(cpu_ops, "_BLOCK_NUMBERS", 100)
    if budget is not None:
        _random.clear_cache()
        monkeypatch.setattr(_random, "_budget", budget)
    rec = {"masking": lambda: tr.masking_reconciliation(p=0.4, seed=3),
           "rmh": lambda: tr.random_matrix_hypernet_reconciliation(r=3, l=6, hidden_dim=5, seed=2**40 + 1),
           "hypernet": lambda: tr.hypernet_reconciliation(l=6, hidden_dim=4, seed=9)}[family]()
    n, D = 5, 203
    x = torch.randn(7, 2 * D, dtype=dtype)[:, ::2]   # non-contiguous
    w, b = torch.randn(2, rec.calculate_l(n, D), dtype=dtype), torch.randn(n, dtype=dtype)
    outs = {}
    for backend in ("cpu", "torch"):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = rec.apply(xs, ws, n=n, bias=b, backend=backend)
        outs[backend] = (y, *torch.autograd.grad(y, (xs, ws), torch.ones_like(y)))
    for got, expected in zip(outs["cpu"], outs["torch"]):
        assert_close(got, expected)


def _mask(seed, n, D, p):
    return (_definition(seed, 0, n * D, 0).view(n, D) < torch.tensor(p, dtype=torch.float32)).float()


def test_masking_pass_over_long_rows():
    """src * (u < p) for a column block of rows longer than the pass draws at once (256)."""
    seed, start, rows, cols, stride, p = 2**40 + 5, 2**32 - 300, 3, 701, 777, 0.3
    src, got = torch.randn(rows, cols + 4), torch.empty(rows, cols)
    cpu_lib.call("tinyrecon_cpu_philox_mask", 2, seed, start, rows, cols, stride, p, src.data_ptr(), src.stride(0),
                 got.data_ptr(), cols)
    u = _definition(seed, start, rows * stride, 0).view(rows, stride)[:, :cols]
    assert torch.equal(got, src[:, :cols] * (u < p).float())


@pytest.mark.parametrize("n, D", [(1, 1), (3, 64), (5, 203), (2, 1000)])
def test_mask_bits_are_the_mask(n, D):
    """Bit b of word q in row i is mask[i, 64 q + b]; bits past D are 0."""
    bits = torch.empty(n, (D + 63) // 64, dtype=torch.int64)
    cpu_lib.call("tinyrecon_cpu_mask_bits", 2, 2**40 + 9, n, D, 0.3, bits.data_ptr())
    unpacked = (bits.unsqueeze(-1) >> torch.arange(64)) & 1
    assert torch.equal(unpacked.reshape(n, -1)[:, :D].float(), _mask(2**40 + 9, n, D, 0.3))
    assert not unpacked.reshape(n, -1)[:, D:].any()


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("N, n, D, j0", [(5, 3, 37, 0), (7, 6, 1000, 13), (9, 4, 600, 70), (1, 1, 1, 0),
                                         (3, 5, 300, 49), (64, 8, 1100, 64)])   # 49: bits from two words
def test_masked_gemms(N, n, D, j0, masked):
    """The library's GEMMs (masking's, and the hypernets' without a mask) against float64 ones: odd
    sizes (tile edges), a column offset into the mask, strided x/w/out, accumulation."""
    Dm, p, seed = j0 + D + 5, 0.4, 3
    bits = torch.empty(n, (Dm + 63) // 64, dtype=torch.int64)
    cpu_lib.call("tinyrecon_cpu_mask_bits", 2, seed, n, Dm, p, bits.data_ptr())
    M = _mask(seed, n, Dm, p)[:, j0:j0 + D] if masked else torch.ones(n, D)
    x, w, g = torch.randn(N, D + 3)[:, :D], torch.randn(n, D + 5)[:, :D], torch.randn(N, n)
    Wm = (w * M).double()
    for op, out, expected in ((0, torch.full((N, n + 2), 7.0), x.double() @ Wm.T),
                              (1, torch.full((N, D + 1), 7.0), g.double() @ Wm),
                              (2, torch.full((n, D + 1), 7.0), (g.double().T @ x.double()) * M)):
        cols = out.shape[1] - (2 if op == 0 else 1)
        for accumulate in (False, True) if op != 2 else (False,):
            cpu_lib.call("tinyrecon_cpu_masked_gemm", op, 2, bits.data_ptr() if masked else None, bits.shape[1],
                         j0 if masked else 0, N, n, D, x.data_ptr(), x.stride(0), w.data_ptr(), w.stride(0),
                         g.data_ptr(), out.data_ptr(), out.stride(0), int(accumulate))
        want = expected * 2 if op != 2 else expected
        assert_close(out[:, :cols], want, dtype=torch.float32)
        assert (out[:, cols:] == 7).all()   # nothing written past the block


def test_random_linear_reads_kept_rows_as_it_draws():
    """The hypernets' pass: W and dv equal with M drawn in the pass and read from kept rows."""
    from tinyrecon import cpu_ops
    n, D, k, C, seed_m, seed_c = 5, 203, 3, 2, 2**33 + 1, 7
    v, dW = torch.randn(C, k), torch.randn(C, n, 50)
    M = _definition(seed_m, 0, n * D * k, 1).view(n, D, k)
    b = _definition(seed_c, 0, n * D, 1).view(n, D)
    expected = torch.einsum("ijq,cq->cij", M.double(), v.double()) + b.double()
    for frozen in ((None, None), cpu_ops._frozen(seed_m, seed_c, n, D, k)):
        dv = torch.zeros(C, k)
        W = cpu_ops._linear_block(v, seed_m, seed_c, n, D, 17, 67, frozen, True, dW, dv)
        assert_close(W, expected[:, :, 17:67])
        assert_close(dv, torch.einsum("cij,ijq->cq", dW.double(), M[:, 17:67].double()))


def _linear_reference(v, seed_m, seed_c, n, D):
    """W (C, n, D) = reshape(M @ v^T (+ b)) in float64, and M (n, D, k), from the definition."""
    C, k = v.shape
    M = _definition(seed_m, 0, n * D * k, 1).view(n, D, k).double()
    W = torch.einsum("ijq,cq->cij", M, v.double())
    if seed_c is not None:
        W = W + _definition(seed_c, 0, n * D, 1).view(n, D).double()
    return W, M


@pytest.mark.parametrize("budget", [None, 0])   # M kept in the cache, or drawn in the kernel
@pytest.mark.parametrize("N, n, D, k, C, seed_c", [
    (5, 3, 37, 5, 1, None),      # one short chunk
    (7, 5, 1100, 3, 2, 7),       # odd n, two channels, b, columns past two chunks and a short tile
    (64, 9, 1300, 5, 1, None),   # a full batch tile, rows past a multiple of 4
    (3, 1, 17, 1, 3, 5),         # rank 1, one row
    (6, 4, 203, 8, 1, 2**40),    # the largest fused rank
    (0, 3, 50, 2, 1, None),      # empty batch
])
def test_fused_random_gemms(N, n, D, k, C, seed_c, budget, monkeypatch):
    """The hypernets' fused GEMMs (W formed inside them from M's rows) against float64 ones from the
    definition: y, dx and dv, and dx or dv alone; M read from the cache and drawn."""
    from tinyrecon import cpu_ops
    _random.clear_cache()
    if budget is not None:
        monkeypatch.setattr(_random, "_budget", budget)
    seed_m = 2**33 + 1
    v, g = torch.randn(C, k), torch.randn(C, N, n)
    x = torch.randn(N, D + 3)[:, :D]   # rows of a wider matrix
    W, M = _linear_reference(v, seed_m, seed_c, n, D)
    y = cpu_ops.random_linear_forward(x, v, seed_m, seed_c, n)
    assert_close(y, torch.matmul(x.double(), W.transpose(1, 2)), dtype=torch.float32)
    dx, dv = cpu_ops.random_linear_backward(g, x, v, seed_m, seed_c, n, True, True)
    assert_close(dx, torch.einsum("cbi,cij->bj", g.double(), W), dtype=torch.float32)
    assert_close(dv, torch.einsum("cbi,bj,ijq->cq", g.double(), x.double(), M), dtype=torch.float32)
    only_dx, none = cpu_ops.random_linear_backward(g, x, v, seed_m, seed_c, n, True, False)
    none2, only_dv = cpu_ops.random_linear_backward(g, x, v, seed_m, seed_c, n, False, True)
    assert torch.equal(only_dx, dx) and torch.equal(only_dv, dv) and none.numel() == none2.numel() == 0
    kept = _random.cache_info()["bytes"] >= n * D * k * 4
    assert kept == (budget is None)

