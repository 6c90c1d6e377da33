"""The dispatch table: auto choice, the three overrides and their precedence, clear refusals."""
import pytest
import torch

import tinyrecon as tr
from tinyrecon import dispatch, ops


def test_auto_on_cpu_is_the_cpu_library_where_it_has_the_op_else_torch(monkeypatch):
    monkeypatch.delenv("TINYRECON_BACKEND", raising=False)
    library = dispatch.why_not("cpu", None, "cpu") == ""
    for op in ops.OPS:   # the builds without a kernel run the reference under the cpu name (FALLBACK)
        assert dispatch.resolve(op, "cpu") == ("cpu" if library else "torch"), op
        if library:
            kernel = "cpu" in ops.OPS[op].impls
            assert dispatch.table("cpu")[op]["cpu"] == ("kernel" if kernel else "reference"), op
            assert (dispatch.get(op, "cpu") is ops.OPS[op].impls["torch"]) == (not kernel), op


def test_cpu_library_is_built_where_a_compiler_is():
    """pip install builds the CPU library whenever a C++ compiler is found (TINYRECON_BUILD_CPU=auto)."""
    import os

    import build_libs

    from tinyrecon import cpu_lib
    if os.environ.get("TINYRECON_BUILD_CPU") == "0" or not build_libs.find_cxx():
        pytest.skip("no C++ compiler here, or the build was switched off")
    assert cpu_lib.load_error() == ""


@pytest.mark.skipif(bool(dispatch.why_not("cpu", None, "cpu")), reason="no CPU library here")
def test_cpu_library_types_its_entry_points_from_their_c_signatures(monkeypatch):
    """csrc/entry_points.h derives each entry point's ctypes types from its C++ signature; every
    exported function is on that list, and a name the library lacks is refused, never called untyped."""
    import ctypes
    import subprocess

    from tinyrecon import cpu_lib
    lib = cpu_lib._load()[0]
    nm = subprocess.run(["nm", "-D", "--defined-only", cpu_lib.library_path()], capture_output=True, text=True,
                        check=True)
    exported = {line.split()[-1] for line in nm.stdout.splitlines() if line.split()[1:2] in (["T"], ["W"])}
    assert lib.entry_points | {"tinyrecon_entry_points"} == exported
    expand = lib.tinyrecon_cpu_kron_expand   # (int dtype, int threads, 3 pointers, 4 int64)
    assert expand.restype is ctypes.c_int
    assert expand.argtypes == [ctypes.c_int] * 2 + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4
    assert lib.tinyrecon_cpu_philox_mask.argtypes[6] is ctypes.c_float
    monkeypatch.setattr(lib, "entry_points", lib.entry_points - {"tinyrecon_cpu_kron_expand"})
    with pytest.raises(RuntimeError, match="no entry point tinyrecon_cpu_kron_expand: it was built from other"):
        cpu_lib.call("tinyrecon_cpu_kron_expand", 0, 1, None, None, None, 0, 0, 0, 0)


def test_every_op_has_a_torch_reference_with_that_name(monkeypatch):
    monkeypatch.setitem(dispatch._STATUS, "cuda device", "")   # as if a GPU and the library were here
    monkeypatch.setitem(dispatch._STATUS, "cuda", "")
    for op in ops.OPS:
        assert dispatch.get(op, "cpu", "torch") is ops.OPS[op].impls["torch"], op
        assert ops.OPS[op].impls["torch"].__name__ == op
        if dispatch.implementation(op, "cuda") is None:
            assert f"the cuda backend has no kernel for {op}" == dispatch.why_not("cuda", op, "cuda")
    assert dispatch.why_not("cuda", "masking_apply", "cuda") and not dispatch.why_not("cuda", "kron_apply", "cuda")


def test_precedence_call_over_block_over_env(monkeypatch):
    monkeypatch.setenv("TINYRECON_BACKEND", "cuda")
    assert dispatch.requested() == "cuda"
    with tr.use_backend("triton"):
        assert dispatch.requested() == "triton"
        assert dispatch.requested("torch") == "torch"
    assert dispatch.requested() == "cuda"


def test_env_override_reaches_ops(monkeypatch):
    monkeypatch.setenv("TINYRECON_BACKEND", "cuda")
    rec = tr.hm_reconciliation()
    w, x = torch.randn(18), torch.randn(2, 12)
    with pytest.raises(tr.BackendUnavailable, match="backend 'cuda' cannot run kron_apply"):
        rec.apply(x, w, n=6)
    assert rec.apply(x, w, n=6, backend="torch").shape == (2, 6)


def test_refusals_say_why(monkeypatch):
    assert dispatch.why_not("cuda", None, "cpu")            # the CUDA library never takes CPU tensors
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "set TRITON_INTERPRET=1" in dispatch.why_not("triton", None, "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.why_not("triton", None, "cpu") == ""
    assert "not mps tensors" in dispatch.why_not("triton", None, "mps")
    with pytest.raises(ValueError, match="unknown backend"):
        with tr.use_backend("numpy"):
            pass
    with pytest.raises(tr.BackendUnavailable):
        dispatch.resolve("kron_apply", "cpu", "nope")
    assert dispatch.available("cpu")["torch"] == ""


def test_instance_backend_is_the_default_for_its_calls():
    rec = tr.hm_reconciliation(backend="cuda")
    with pytest.raises(tr.BackendUnavailable):
        rec.apply(torch.randn(2, 12), torch.randn(18), n=6)
    assert rec.apply(torch.randn(2, 12), torch.randn(18), n=6, backend="torch").shape == (2, 6)


def test_the_most_basic_missing_thing_comes_first(monkeypatch):
    monkeypatch.setitem(dispatch._STATUS, "triton?", "no")      # as if Triton were not installed
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for device_type in ("cpu", "cuda", "mps"):
        assert dispatch.why_not("triton", None, device_type).startswith("Triton is not installed")
    monkeypatch.setitem(dispatch._STATUS, "cuda device", "no CUDA device: test")
    assert dispatch.why_not("cuda", None, "cuda") == "no CUDA device: test"
    assert dispatch.why_not("cpu", "kron_apply", "cuda") == "no CUDA device: test"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_without_a_cuda_device_that_is_the_reason():
    for backend in dispatch.BACKENDS:
        assert dispatch.why_not(backend, None, "cuda").startswith("no CUDA device: ")


def test_available_lists_only_backends_that_run_that_device_type():
    known = {"torch", "triton", "cuda", "cpu"}   # a backend added later is checked in its own tests
    assert set(dispatch.available("cpu")) & known == {"torch", "triton", "cpu"}
    assert set(dispatch.available("cuda")) & known == {"torch", "triton", "cuda"}
    assert set(dispatch.available("mps")) & known == {"torch"}
    with pytest.raises(ValueError, match="takes a device type .* not 'triton'; available\\('cuda'\\)\\['triton'\\]"):
        dispatch.available("triton")
