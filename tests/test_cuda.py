"""The CUDA backend (csrc/ + cuda_lib + cuda_ops).

Build and ABI (needs nvcc only): every csrc/ source compiles with nvcc, warnings as errors,
into a library whose exported functions are exactly the plain-C entry points the glue calls.

Ops against their torch reference (values per dtype, odd shapes, empty batch, non-contiguous
x, gradients, fp64 gradcheck, torch.library.opcheck) run twice: on a GPU with the real library
("cuda", skipped without one), and on host tensors through a host build of the library
("host": every csrc/ source, the device kernels of csrc/kernels.cu included, compiled as C++ on
the SIMT emulation of tests/simt/, which runs each CUDA thread of a block as its own fiber), so
the kernels themselves (tile edges, split-K, shared memory, barriers, warp shuffles) and every
composition over them (strides, workspaces, chain rules, glue) are checked without a GPU.
"""
import ctypes
import glob
import os
import re
import subprocess

import build_libs
import pytest
import torch

import tinyrecon as tr
from tinyrecon import _clib, cuda_lib, dispatch
from tinyrecon.functions import kron as kron_ref
from tinyrecon.functions import lowrank as lowrank_ref
from tinyrecon.functions import padding as padding_ref

from conftest import DTYPES, assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = build_libs.find_nvcc()
GPU_REASON = dispatch.why_not("cuda", "kron_apply", "cuda") if torch.cuda.is_available() else "no CUDA device"
gpu = pytest.mark.skipif(bool(GPU_REASON), reason=f"CUDA backend unavailable: {GPU_REASON}")


# ---- build and ABI (no GPU needed) ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def built_library(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc not found")
    # One arch keeps this quick; setup.py builds the archs of TORCH_CUDA_ARCH_LIST.
    return _nvcc(sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu"))),
                 str(tmp_path_factory.mktemp("cuda") / cuda_lib.LIB_NAME))


def _nvcc(sources, out, *extra):
    command = build_libs.nvcc_command(NVCC, sources, out, arch_list="8.0", werror=True)
    command[1:1] = list(extra)
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    return out


def test_library_exports_exactly_the_entry_points(built_library):
    nm = subprocess.run(["nm", "-D", "--defined-only", built_library], capture_output=True, text=True, check=True)
    functions = {line.split()[-1] for line in nm.stdout.splitlines() if line.split()[1:2] in (["T"], ["W"])}
    # every exported function is on the library's own typed list, so none is ever called untyped
    listed = _clib.open_library(built_library).entry_points
    assert listed | {"tinyrecon_entry_points"} == functions
    assert {"tinyrecon_last_error", "tinyrecon_device_count", "tinyrecon_kron_apply_bwd"} <= listed


def test_library_loads_and_says_why_it_cannot_run(built_library, monkeypatch):
    monkeypatch.setenv("TINYRECON_CUDA_LIB", built_library)
    cuda_lib._load.cache_clear()
    try:
        reason = cuda_lib.load_error()
    finally:
        cuda_lib._load.cache_clear()
    assert "does not load" not in reason    # every entry point resolved
    if torch.cuda.is_available():
        assert reason == ""
    else:
        assert "CUDA" in reason
    if "cudaErrorInsufficientDriver" in reason:   # no driver, or an old one: say which one it needs
        assert "R580" in reason


def test_missing_library_is_a_reason_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYRECON_CUDA_LIB", str(tmp_path / "absent.so"))
    cuda_lib._load.cache_clear()
    try:
        assert "no CUDA library at" in cuda_lib.load_error()
        with pytest.raises(cuda_lib.CudaError, match="no CUDA library"):
            cuda_lib.call("tinyrecon_device_count", None)
    finally:
        cuda_lib._load.cache_clear()


def test_arch_list():
    assert build_libs.gencode_flags("8.0;9.0+PTX") == [
        "-gencode", "arch=compute_80,code=[sm_80]", "-gencode", "arch=compute_90,code=[sm_90,compute_90]"]
    assert build_libs.gencode_flags("sm_86") == ["-gencode", "arch=compute_86,code=[sm_86,compute_86]"]
    # the newest arch always carries PTX (forward compatibility), the others only when asked
    assert build_libs.gencode_flags("9.0;8.0") == [
        "-gencode", "arch=compute_90,code=[sm_90,compute_90]", "-gencode", "arch=compute_80,code=[sm_80]"]
    with pytest.raises(ValueError, match="cannot read CUDA arch"):
        build_libs.gencode_flags("ampere")


# ---- ops against the torch reference -------------------------------------------------------------------
@pytest.fixture(scope="module", params=["host", "cuda"])
def device(request, tmp_path_factory):
    """'cuda' (the real library on a GPU) or 'cpu' (its SIMT emulation build, see the module docstring)."""
    from tinyrecon import cuda_ops
    if request.param == "cuda":
        if GPU_REASON:
            pytest.skip(f"CUDA backend unavailable: {GPU_REASON}")
        yield "cuda"
        return
    if NVCC is None:
        pytest.skip("nvcc not found")
    out = simt_library(tmp_path_factory.mktemp("simt"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYRECON_CUDA_LIB", out)
        cuda_lib._load.cache_clear()
        assert cuda_lib.load_error() == ""
        cuda_ops.register()   # the ops of the library's entry points
        yield "cpu"
    cuda_lib._load.cache_clear()


# kernel<...><<<config>>>(args);  ->  ::simt::launch(::simt::Config(config), label, kernel<...>, args);
_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^;<>]*>)?)<<<(.*?)>>>\((.*?)\);", re.S)


def simt_library(directory, kernels_source=None):
    """The library built from csrc/ for host memory, its kernels (csrc/kernels.cu, or the text
    ``kernels_source``) compiled as C++ on the SIMT emulation of tests/simt/. Launches are the one
    thing C++ cannot parse: each ``<<<...>>>`` is rewritten into a call of ``simt::launch``,
    labelled with the launching function (its template arguments name the tile)."""
    csrc = os.path.join(ROOT, "csrc")
    if kernels_source is None:
        with open(os.path.join(csrc, "kernels.cu")) as f:
            kernels_source = f.read()
    rewritten, count = _LAUNCH.subn(r"::simt::launch(::simt::Config(\2), __PRETTY_FUNCTION__, \1, \3);",
                                    kernels_source)
    assert count == kernels_source.count("<<<") > 0
    kernels = os.path.join(directory, "kernels.cu")
    with open(kernels, "w") as f:
        f.write(rewritten)
    sources = [f for f in sorted(glob.glob(os.path.join(csrc, "*.cu"))) if not f.endswith("kernels.cu")]
    out = os.path.join(directory, "libtinyrecon_simt.so")
    command = [NVCC, "-x", "c++", "-std=c++20", "-O2", "-shared", "-cudart", "none",
               "-Xcompiler", "-fPIC,-Wall,-Wextra,-Werror,-Wno-unknown-pragmas,-U_FORTIFY_SOURCE",
               "--pre-include", os.path.join(ROOT, "tests", "simt", "cuda_host.h"), "-I", csrc,
               "-o", out, kernels, *sources, os.path.join(ROOT, "tests", "simt", "simt.cpp")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    return out


def _compare(op, ref, args, dtype, transpose_x=False):
    """``op`` vs ``ref`` on the same dtype-rounded values (reference in fp64): output and every gradient.

    ``transpose_x``: pass args[0] as a non-contiguous (transposed) view.
    """
    leaves, ref_leaves, call, ref_call = [], [], [], []
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            call.append(a)
            ref_call.append(a)
            continue
        value = a.to(dtype)
        leaf = (value.t().contiguous() if i == 0 and transpose_x else value).requires_grad_()
        ref_leaf = leaf.detach().double().requires_grad_()
        leaves.append(leaf)
        ref_leaves.append(ref_leaf)
        call.append(leaf.t() if i == 0 and transpose_x else leaf)
        ref_call.append(ref_leaf.t() if i == 0 and transpose_x else ref_leaf)
    out, expected = op(*call), ref(*ref_call)
    assert out.dtype == dtype and out.shape == expected.shape
    assert_close(out, expected, dtype)
    g = torch.randn_like(expected).to(dtype)
    out.backward(g)
    expected.backward(g.double())
    for leaf, ref_leaf in zip(leaves, ref_leaves):
        assert leaf.grad is not None and leaf.grad.dtype == dtype
        assert_close(leaf.grad, ref_leaf.grad, dtype)


def _factors(randn, C, p, q, rA, s, t, rB):
    A = (randn(C, p, rA), randn(C, rA, q)) if rA else (randn(C, p, q), None)
    B = (randn(C, s, rB), randn(C, rB, t)) if rB else (randn(C, s, t), None)
    return (*A, *B)


def _randn_on(device):
    return lambda *shape: torch.randn(*shape, dtype=torch.float64, device=device)


# C, p, q, rA, s, t, rB: hm, lphm, dual_lphm; sizes not multiples of 16 or 64, some past one 64-tile.
KRON = [(1, 3, 5, 0, 7, 3, 0), (2, 5, 3, 0, 3, 67, 2), (2, 2, 3, 2, 3, 5, 2), (3, 65, 1, 3, 1, 9, 1)]
BATCH = [0, 5, 70, 600]   # 600: weight gradients long enough in K to be split across blocks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", KRON)
@pytest.mark.parametrize("N", BATCH)
@pytest.mark.parametrize("with_bias", [False, True])
def test_kron_apply(device, dtype, dims, N, with_bias):
    randn = _randn_on(device)
    C, p, q, rA, s, t, rB = dims
    bias = randn(p * s) if with_bias else None
    args = (randn(N, q * t), *_factors(randn, *dims), bias, "kron")
    _compare(tr.ops.OPS["kron_apply"].impls["cuda"], kron_ref.kron_apply, args, dtype, transpose_x=N == 70)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", KRON)
@pytest.mark.parametrize("layout", ["kron", "tinybig"])
def test_kron_build(device, dtype, dims, layout):
    _compare(tr.ops.OPS["kron_build"].impls["cuda"], kron_ref.kron_build, (*_factors(_randn_on(device), *dims), layout), dtype)


def test_kron_apply_tinybig_layout_is_the_build_and_one_gemm(device):
    randn = _randn_on(device)
    args = (randn(4, 12), *_factors(randn, 1, 2, 3, 0, 3, 4, 0), None, "tinybig")
    torch.testing.assert_close(tr.ops.OPS["kron_apply"].impls["cuda"](*args), kron_ref.kron_apply(*args))


# C, p, q, s, t: p < q, p > q, p = q with s past a 64-tile
BLOCK = [(1, 2, 3, 4, 5), (2, 3, 2, 5, 3), (2, 3, 3, 66, 2)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", BLOCK)
@pytest.mark.parametrize("N", BATCH)
@pytest.mark.parametrize("with_bias", [False, True])
def test_duplicated_diagonal_padding_apply(device, dtype, dims, N, with_bias):
    randn = _randn_on(device)
    C, p, q, s, t = dims
    args = (randn(N, q * t), randn(C, s, t), p, q, randn(p * s) if with_bias else None)
    _compare(tr.ops.OPS["duplicated_diagonal_padding_apply"].impls["cuda"], padding_ref.duplicated_diagonal_padding_apply, args, dtype, transpose_x=N == 70)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", BLOCK)
def test_duplicated_diagonal_padding_build(device, dtype, dims):
    C, p, q, s, t = dims
    _compare(tr.ops.OPS["duplicated_diagonal_padding_build"].impls["cuda"], padding_ref.duplicated_diagonal_padding_build, (_randn_on(device)(C, s, t), p, q), dtype)


# C, n, r, D
LOWRANK = [(1, 7, 2, 9), (3, 65, 3, 130), (2, 3, 1, 4)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", LOWRANK)
@pytest.mark.parametrize("N", BATCH)
@pytest.mark.parametrize("with_bias", [False, True])
def test_lorr_apply(device, dtype, dims, N, with_bias):
    randn = _randn_on(device)
    C, n, r, D = dims
    args = (randn(N, D), randn(C, n, r), randn(C, r, D), randn(n) if with_bias else None)
    _compare(tr.ops.OPS["lorr_apply"].impls["cuda"], lowrank_ref.lorr_apply, args, dtype, transpose_x=N == 70)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", LOWRANK)
def test_lorr_build(device, dtype, dims):
    randn = _randn_on(device)
    C, n, r, D = dims
    _compare(tr.ops.OPS["lorr_build"].impls["cuda"], lowrank_ref.lorr_build, (randn(C, n, r), randn(C, r, D)), dtype)


def _small_cases(device):
    randn = _randn_on(device)
    x = randn(3, 6)
    return {
        "kron_build": (*_factors(randn, 2, 2, 3, 2, 3, 2, 1), "kron"),
        "kron_apply": (x, *_factors(randn, 2, 2, 3, 2, 3, 2, 1), randn(6), "kron"),
        "duplicated_diagonal_padding_build": (randn(2, 2, 3), 3, 2),
        "duplicated_diagonal_padding_apply": (x, randn(2, 2, 3), 3, 2, randn(6)),
        "lorr_build": (randn(2, 4, 2), randn(2, 2, 6)),
        "lorr_apply": (x, randn(2, 4, 2), randn(2, 2, 6), randn(4)),
    }


OPS = list(_small_cases("cpu"))   # every op of the backend, each with one case here


@pytest.mark.parametrize("op", [op for op in OPS if op.endswith("_apply")])
def test_strided_bias(device, op):
    """A bias view with a stride of 2 (apply passes views through; the glue copies it to the dense
    buffer the library reads): values and gradients as the reference's."""
    ref, at = tr.ops.OPS[op].impls["torch"], [p for p, _ in tr.ops.OPS[op].params].index("bias")
    args = list(_small_cases(device)[op])
    args[at] = torch.randn(2 * len(args[at]), dtype=torch.float64, device=device)[::2]
    assert not args[at].is_contiguous()
    _compare(tr.ops.OPS[op].impls["cuda"], ref, args, torch.float64)


def test_ops_are_the_library_entry_points(device):
    """The backend has exactly the ops whose entry points the library lists (cuda_ops.register)."""
    assert {name for name, op in tr.ops.OPS.items() if "cuda" in op.impls} == set(OPS)


def _requiring_grad(args):
    return [a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("op", OPS)
def test_gradcheck_fp64(device, op):
    assert torch.autograd.gradcheck(tr.ops.OPS[op].impls["cuda"], _requiring_grad(_small_cases(device)[op]))


@pytest.mark.parametrize("op", OPS)
def test_double_backward_is_refused_by_name(device, op):
    """The backward kernels are first-order: create_graph=True names the op and the way out."""
    args = _requiring_grad(_small_cases(device)[op])
    y = tr.ops.OPS[op].impls["cuda"](*args)
    with pytest.raises(RuntimeError, match=r"tinyrecon::cuda_\w+ \(the cuda backend\) has a first-order "
                                           r"backward only.*backend='torch'"):
        torch.autograd.grad(y.square().sum(), [a for a in args if isinstance(a, torch.Tensor)], create_graph=True)


@pytest.mark.parametrize("op", OPS)
def test_opcheck(device, op):
    """Schema, fake (meta) kernels and autograd registration agree with the real kernels."""
    args = _requiring_grad(_small_cases(device)[op])
    torch.library.opcheck(getattr(torch.ops.tinyrecon, f"cuda_{op}").default, args)


@pytest.mark.parametrize("op", OPS)
def test_torch_compile_fullgraph(device, op):
    """torch.compile sees each op (and its backward) as one custom op: no graph break."""
    torch._dynamo.reset()
    fn = tr.ops.OPS[op].impls["cuda"]
    args = _requiring_grad(_small_cases(device)[op])
    expected = fn(*args)
    expected_grads = torch.autograd.grad(expected.sum(), [a for a in args if isinstance(a, torch.Tensor)])
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    grads = torch.autograd.grad(out.sum(), [a for a in args if isinstance(a, torch.Tensor)])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grads, expected_grads)


def test_emulation_ran_every_kernel_and_tile(device):
    """The host build ran each kernel of csrc/kernels.cu, each GEMM tile and split-K (whose partial
    sums are rounded by the cast kernel): shapes here cross each tile's edges."""
    if device != "cpu":
        pytest.skip("counts launches of the SIMT emulation")
    count = cuda_lib._load()[0].simt_launch_count
    count.argtypes, count.restype = [ctypes.c_char_p], ctypes.c_long
    before = {part: count(part.encode()) for part in _KERNELS}
    randn = _randn_on(device)
    for N in (5, 600):
        for n in (7, 21, 70):   # lowrank's forward GEMM has N = n: the 16-, 32- and 64-wide tiles
            _compare(tr.ops.OPS["lorr_apply"].impls["cuda"], lowrank_ref.lorr_apply,
                     (randn(N, 9), randn(2, n, 3), randn(2, 3, 9), None), torch.float32)
    _compare(tr.ops.OPS["kron_build"].impls["cuda"], kron_ref.kron_build, (*_factors(randn, 2, 2, 3, 0, 3, 2, 0), "kron"),
             torch.float32)
    _compare(tr.ops.OPS["duplicated_diagonal_padding_apply"].impls["cuda"], padding_ref.duplicated_diagonal_padding_apply,
             (randn(5, 6), randn(2, 2, 3), 3, 2, randn(6)), torch.float32)
    ran = {part: count(part.encode()) - before[part] for part in _KERNELS}
    assert all(ran.values()), ran


# Parts of the emulation's launch labels (the launching function, with its template arguments).
_KERNELS = ["int BM = 256; int BN = 16", "int BM = 128; int BN = 32", "int BM = 64; int BN = 64",
            "tr::kron_build(", "tr::kron_build_grad(", "tr::fill(", "tr::cast("]


def test_errors_carry_the_library_message(device):
    A = torch.randn(1, 2, 2, device=device)
    stream = torch.cuda.current_stream().cuda_stream if device == "cuda" else None
    args = (ctypes.c_int64 * 12)(A.data_ptr(), 1, 2, 2, A.data_ptr(), 1, 2, 2, A.data_ptr(), 1, 2, 2)
    with pytest.raises(cuda_lib.CudaError, match="unsupported dtype code"):
        cuda_lib.call("tinyrecon_lorr_build", A.device.index or 0, stream, 99, args, None, None)


@gpu
@pytest.mark.parametrize("make", [
    lambda: tr.hm_reconciliation(p=3, q=4), lambda: tr.lphm_reconciliation(p=3, q=4, r=2),
    lambda: tr.dual_lphm_reconciliation(p=3, q=4, r=2), lambda: tr.lorr_reconciliation(r=3),
    lambda: tr.duplicated_diagonal_padding_reconciliation(p=3, q=4)])
def test_public_api_on_the_cuda_backend(make):
    rec = make()
    n, D, C = 9, 20, 2
    w = torch.randn(C, rec.calculate_l(n, D), device="cuda")
    x = torch.randn(4, 5, D, device="cuda")
    assert_close(rec.apply(x, w, n=n, backend="cuda"), rec.apply(x, w, n=n, backend="torch"))
    assert_close(rec(n, D, w, backend="cuda"), rec(n, D, w, backend="torch"))
