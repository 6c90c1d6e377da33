"""The benchmark (tinyrecon.benchmark: cases, check, timing, runner, report) and the ``tinyrecon``
command: arguments, errors, output files, compare, info, and a broken kernel reported as wrong and
never timed."""
import dataclasses
import json
import math
import runpy
import sys

import pytest
import torch

from tinyrecon import cli, dispatch, ops, registry
from tinyrecon.benchmark import cases, check, report, runner, timing
from tinyrecon.functions import kron

CPU = torch.device("cpu")
FAST = timing.Mode(budget_s=0.0, min_reps=2, max_reps=2, max_call_s=5.0)
TINY = ["--shapes", "small", "--backends", "torch"]


def bench(tmp_path, *args):
    return cli.main(["bench", *TINY, "--out", str(tmp_path), *args])


# ---- arguments and errors ----------------------------------------------------------------------
@pytest.mark.parametrize("flag, bad, valid", [
    ("--functions", "dual_lphmm", "dual_lphm"),
    ("--shapes", "huge", "square4096"),
    ("--backends", "metal", "triton"),
    ("--ops", "backward", "fwdbwd"),
])
def test_unknown_names_list_the_valid_ones(flag, bad, valid, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", flag, bad, "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert repr(bad) in err and valid in err
    assert not (tmp_path / "results.json").exists()


def test_bad_dtype_and_missing_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--dtype", "int8"])
    assert "float32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([])


def test_select_defaults_names_and_families():
    quick = cases.select()
    assert {c.shape for c in quick} == {"small", "tiny", "tall", "mnist"}
    assert {(c.function, c.op) for c in quick if c.shape == "mnist"} == {("dual_lphm", "fwdbwd"),
                                                                         ("dual_lphm", "train")}   # the headline
    assert {c.shape for c in cases.select(quick=False)} == set(cases.SHAPES)
    assert {c.shape for c in cases.select(shapes=["small"])} == {"small"}        # no headline when shapes are named
    picked = cases.select(functions=["kron", "tinybig.reconciliation.lorr_reconciliation,hm"], shapes=["small,tall"],
                          backends=["torch"], ops=["fwd"])
    assert [c.id for c in picked] == [f"{f}-{s}-fwd-torch" for s in ("small", "tall")
                                      for f in ("hm", "lphm", "dual_lphm", "lorr")]
    assert cases.select(functions=["rma"], shapes=["small"], backends=["torch"], ops=["build"]) == \
        [cases.Case("random_matrix_adaption", "small", "build", "torch")]
    assert cases.function_names(["hypernet"]) == ["hypernet"]                    # the function, not the family
    assert cases.family_functions("hypernet") == ["hypernet", "random_matrix_hypernet"]
    assert cases.dtypes(["float32,bfloat16"]) == [torch.float32, torch.bfloat16]


def test_every_function_has_a_family_module_and_existing_ops():
    assert set(cases.FAMILIES) == {"basic", "hypernet", "kron", "lowrank", "masking", "padding"}
    for f in cases.FUNCTIONS:
        prefix = registry.CLASSES[f].op
        if prefix is None:
            assert cases.FAMILY[f] == "basic"
        else:
            assert {f"{prefix}_build", f"{prefix}_apply"} <= set(ops.OPS)


def test_headline_config_is_the_mnist_rpn_layer():
    s = cases.SHAPES["mnist"]
    rec = cases.make_function("dual_lphm")
    assert (s.n, s.D, s.batch) == (64, 615440, 64)
    assert rec.pq(s.n, s.D) == (8, 784) and rec.r == 5
    t = cases.SHAPES["tiny"]
    assert (t.n, t.D, t.batch) == (6, 12, 64)   # where a structured apply is compared with one dense F.linear


# ---- a run: output files and JSON schema -------------------------------------------------------
RESULT_KEYS = {"function", "family", "shape", "op", "backend", "n", "D", "batch", "dtype", "status", "reason",
               "ms", "ms_tinybig", "ms_dense", "x_tinybig", "x_dense", "reps", "tol_used", "tol_tinybig", "gbps",
               "tflops", "pct_copy", "cold_ms", "cold_ms_tinybig", "ms_floor", "over_floor", "wall_s"}


def test_bench_writes_table_json_markdown_and_plot(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(timing, "QUICK", FAST)
    assert bench(tmp_path, "--functions", "hm", "constant", "--ops", "fwd", "fwdbwd") == 0
    out = capsys.readouterr().out
    assert "x vs tinyBIG" in out and "x vs dense" in out and "ms / floor" in out and "hm" in out
    data = json.loads((tmp_path / "results.json").read_text())
    meta = data["meta"]
    for key in ("date", "device", "cpu", "torch", "triton", "tinyrecon", "dtype", "mode"):
        assert meta[key]
    assert meta["torch"] == torch.__version__ and meta["dtype"] == "float32"
    assert [(r["function"], r["op"]) for r in data["results"]] == \
        [("hm", "fwd"), ("hm", "fwdbwd"), ("constant", "fwd"), ("constant", "fwdbwd")]   # in the order asked
    for r in data["results"]:
        assert set(r) == RESULT_KEYS
        assert r["status"] == "ok" and r["reps"] == 2 and 0 <= r["tol_used"] <= 1
        assert r["ms"] > 0 and math.isclose(r["x_tinybig"], r["ms_tinybig"] / r["ms"])
        assert math.isclose(r["x_dense"], r["ms_dense"] / r["ms"])
        assert r["ms_floor"] > 0 and math.isclose(r["over_floor"], r["ms"] / r["ms_floor"])
        assert r["cold_ms"] is None and r["wall_s"] > 0          # quick mode: no cold calls unless asked
    md = (tmp_path / "results.md").read_text()
    assert meta["date"] in md and meta["device"] in md and "| hm | small | fwdbwd | torch |" in md
    assert (tmp_path / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_skips_are_reported_with_their_reason(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(timing, "QUICK", FAST)
    assert cli.main(["bench", "--functions", "identity", "--shapes", "small", "--ops", "build",
                     "--out", str(tmp_path)]) == 0
    rows = {r["backend"]: r for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    assert rows["torch"]["status"] == "ok"
    others = [b for b in dispatch.BACKENDS if b != "torch"]
    for b in others:
        assert rows[b]["status"] == "skipped" and rows[b]["ms"] is None
        assert rows[b]["reason"] == "no kernels: plain torch code on every device"
    assert f"no kernels: plain torch code on every device ({len(others)} cases): identity\n" in capsys.readouterr().out


def test_skip_reasons():
    f32 = torch.float32
    case = cases.Case("hm", "small", "fwd", "cuda")
    assert cases.skip_reason(case, CPU, f32) == dispatch.why_not("cuda", "kron_apply", "cpu") != ""
    assert cases.skip_reason(cases.Case("hypernet", "small", "fwd", "torch"), CPU, f32) == ""


def test_cold_calls_are_timed_when_asked(tmp_path, monkeypatch):
    """--cold times the first call in a fresh process: the random families' at every shape, the other
    functions' only at the MNIST shape, never a build; --quick does not time them unless asked."""
    assert cases.times_cold(cases.Case("masking", "small", "fwd", "torch"))
    assert cases.times_cold(cases.Case("lorr", "mnist", "train", "cpu"))
    assert not cases.times_cold(cases.Case("lorr", "small", "fwd", "torch"))
    assert not cases.times_cold(cases.Case("masking", "mnist", "build", "torch"))
    assert not timing.QUICK.cold and timing.FULL.cold
    monkeypatch.setattr(timing, "QUICK", FAST)
    assert bench(tmp_path, "--functions", "masking", "lorr", "--ops", "fwd", "--cold") == 0
    rows = {r["function"]: r for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    assert rows["masking"]["cold_ms"] > 0 and rows["masking"]["cold_ms_tinybig"] > 0
    assert rows["lorr"]["status"] == "ok" and rows["lorr"]["cold_ms"] is None
    r = runner.run_case(cases.Case("masking", "small", "fwd", "torch"), torch.float32, CPU, FAST)
    assert r["status"] == "ok" and r["cold_ms"] is None


def test_floor_is_one_read_of_the_same_x():
    """The floor column times x.sum() of the very x the case applies to (seed 0: w is drawn first)."""
    for op in ("fwd", "train", "fwdbwd"):
        fns, _ = check.prepare(cases.Case("hm", "tiny", op, "torch"), torch.float32, CPU)
        gen = torch.Generator().manual_seed(0)
        torch.randn(cases.make_function("hm").calculate_l(6, 12), generator=gen)
        x = torch.randn(64, 12, generator=gen)
        assert torch.equal(fns["floor"](), x.sum()) and not fns["floor"]().requires_grad
    assert "floor" not in check.prepare(cases.Case("hm", "tiny", "build", "torch"), torch.float32, CPU)[0]


def test_several_dtypes_run_each_case_in_each(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(timing, "QUICK", FAST)
    assert bench(tmp_path, "--functions", "hm", "--ops", "fwd", "--dtype", "float32", "bfloat16") == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert [(r["dtype"], r["status"]) for r in data["results"]] == [("float32", "ok"), ("bfloat16", "ok")]
    assert data["meta"]["dtype"] == "float32,bfloat16"
    assert "| hm | small | fwd | torch | bfloat16 |" in (tmp_path / "results.md").read_text()
    with pytest.raises(SystemExit):
        bench(tmp_path, "--dtype", "float32,int8")
    assert "unknown dtype 'int8'" in capsys.readouterr().err


def test_without_the_bench_extra(tmp_path, capsys, monkeypatch):
    """No matplotlib: no plot, said so (--plot is an error naming the extra); no tqdm: one line per case."""
    monkeypatch.setattr(timing, "QUICK", FAST)
    monkeypatch.setitem(sys.modules, "matplotlib", None)    # what a missing package looks like to find_spec
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with pytest.raises(SystemExit) as e:
        bench(tmp_path, "--functions", "lorr", "--ops", "fwd", "--plot")
    assert e.value.code == 2 and "tinyrecon[bench]" in capsys.readouterr().err
    assert bench(tmp_path, "--functions", "lorr", "--ops", "fwd") == 0
    captured = capsys.readouterr()
    assert "[1/1] lorr-small-fwd-torch float32" in captured.err
    assert "no speedup.png: matplotlib is not installed (pip install 'tinyrecon[bench]')" in captured.out
    assert (tmp_path / "results.json").exists() and not (tmp_path / "speedup.png").exists()
    with pytest.raises(ImportError, match="tinyrecon"):
        report.plot(report.load(tmp_path / "results.json"), tmp_path / "speedup.png")


def test_generator_throughput_is_measured():
    rates = timing.generator_throughput(1 << 16)
    assert not rates or (set(rates) == {"rand", "randn", "memcpy"} and min(rates.values()) > 0)


def test_slow_calls_are_timed_by_one_round_not_skipped():
    """A case over the mode's call limit is still measured: its warm round is the timing."""
    slow = dataclasses.replace(FAST, max_call_s=0.0)
    r = runner.run_case(cases.Case("lorr", "small", "fwd", "torch"), torch.float32, CPU, slow)
    assert r["status"] == "ok" and r["reps"] == 1 and r["ms"] > 0 and r["ms_tinybig"] > 0


# ---- the correctness check ---------------------------------------------------------------------
def _patch_op(monkeypatch, op, impl):
    """Make every backend's ``op`` run ``impl`` (what a buggy kernel would do)."""
    get = dispatch.get
    monkeypatch.setattr(dispatch, "get", lambda name, *args, **kwargs: impl if name == op else get(name, *args, **kwargs))


def test_broken_kernel_is_reported_wrong_and_not_timed(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        return kron.kron_apply(*args, **kwargs) * 1.001   # 0.1% off: far outside the fp32 tolerance
    _patch_op(monkeypatch, "kron_apply", broken)

    def no_timing(*args, **kwargs):
        raise AssertionError("a wrong kernel must not be timed")
    monkeypatch.setattr(timing, "time_interleaved", no_timing)
    assert bench(tmp_path, "--functions", "dual_lphm", "--ops", "fwd", "fwdbwd") == 1
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["status"] for r in results] == ["wrong", "wrong"]
    for r in results:
        assert r["ms"] is None and r["ms_tinybig"] is None and r["tol_used"] > 1
        assert "not timed" in r["reason"]
    assert "WRONG" in capsys.readouterr().out


@pytest.mark.parametrize("candidate, tinybig, status", [(1.5, 1.0, "ok"), (3.0, 1.0, "wrong"), (1.5, 0.5, "wrong")])
def test_beyond_tolerance_passes_only_if_tinybigs_algorithm_is_as_far_off(candidate, tinybig, status, monkeypatch):
    errors = iter([candidate, tinybig])
    monkeypatch.setattr(check, "tolerance_used", lambda *args: next(errors))
    r = runner.run_case(cases.Case("lorr", "small", "fwd", "torch"), torch.float32, CPU, FAST)
    assert (r["status"], r["tol_used"], r["tol_tinybig"]) == (status, candidate, tinybig)
    assert (r["ms"] is None) == (status == "wrong")


def test_failing_kernel_is_an_error_result(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("kernel launch failed")
    _patch_op(monkeypatch, "kron_apply", boom)
    r = runner.run_case(cases.Case("hm", "small", "fwd", "torch"), torch.float32, CPU, FAST)
    assert r["status"] == "error" and r["reason"] == "RuntimeError: kernel launch failed"


def test_tolerance_used():
    e = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    assert check.tolerance_used(e.float(), e, torch.float32) == 0
    bound = 2e-5 * 3 + 2e-5 * 3   # atol scaled by max |e|, plus rtol * |e| at the largest entry
    a = e.clone()
    a[2] += bound / 2
    assert check.tolerance_used(a, e, torch.float32) == pytest.approx(0.5)
    a[0] = float("nan")
    assert check.tolerance_used(a, e, torch.float32) == math.inf
    assert check.tolerance_used(e[:2], e, torch.float32) == math.inf
    assert check.tolerance_used((e, e), (e,), torch.float32) == math.inf


# ---- timing and traffic ------------------------------------------------------------------------
def test_timing_interleaves_candidate_and_baselines():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("candidate", "tinybig", "dense")}
    t = timing.time_interleaved(fns, CPU, timing.Mode(budget_s=0.0, min_reps=3, max_reps=3, max_call_s=1.0))
    assert t["reps"] == 3 and all(t[k] > 0 for k in fns)
    timed = [c for i, c in enumerate(calls) if i >= 6]          # after two warmup calls each (fast ones)
    assert [timed[i] for i in range(0, len(timed)) if i == 0 or timed[i] != timed[i - 1]] == \
        ["candidate", "tinybig", "dense"] * 3                   # A B C A B C A B C (each looped to ~1 ms)


def test_traffic_and_copy_bandwidth():
    nbytes, flops = timing.traffic(cases.Case("hm", "small", "fwd", "torch"), torch.float32)
    l = cases.make_function("hm").calculate_l(6, 12)
    assert nbytes == 4 * (8 * 12 + l + 6 + 8 * 6) and flops == 2 * 8 * 6 * 12
    assert timing.traffic(cases.Case("hm", "small", "build", "torch"), torch.float16) == (2 * (l + 6 * 12), None)
    assert timing.copy_bandwidth(CPU, nbytes=1 << 16, reps=3) > 0


# ---- compare and info --------------------------------------------------------------------------
def _result(function, ms, status="ok"):
    return dict(function=function, shape="small", op="fwd", backend="torch", dtype="float32", status=status, ms=ms)


def test_compare_two_runs(tmp_path, capsys):
    meta = dict(date="d", device="cpu", torch="t", triton="tr", tinyrecon="0", dtype="float32", mode="quick")
    a = {"meta": meta, "results": [_result("hm", 2.0), _result("lorr", 1.0), _result("masking", None, "wrong")]}
    b = {"meta": meta, "results": [_result("hm", 1.0), _result("masking", 3.0), _result("lphm", 1.0)]}
    a["results"].append(_result("hypernet", None, "skipped"))
    b["results"].append(_result("hypernet", None, "skipped"))
    rows = {r["function"]: r for r in report.compare(a, b)}
    assert rows["hm"]["speedup"] == 2.0
    assert rows["lorr"]["speedup"] is None and rows["lorr"]["status_b"] == "absent"
    assert rows["masking"]["speedup"] is None and rows["masking"]["status_a"] == "wrong"
    assert rows["lphm"]["status_a"] == "absent"
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    assert cli.main(["compare", str(pa), str(pb)]) == 0
    out = capsys.readouterr().out
    assert "2x" in out and "ok -> absent" in out and "wrong -> ok" in out and "absent -> ok" in out
    assert "hypernet" not in out and "(1 cases timed in neither run not shown)" in out
    pb.write_text("[]")
    with pytest.raises(SystemExit):
        cli.main(["compare", str(pa), str(pb)])
    assert "not a tinyrecon bench results.json" in capsys.readouterr().err


def test_bench_json_round_trips_through_compare(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(timing, "QUICK", FAST)
    bench(tmp_path / "a", "--functions", "lorr", "--ops", "fwd")
    bench(tmp_path / "b", "--functions", "lorr", "--ops", "fwd")
    rows = report.compare(report.load(tmp_path / "a" / "results.json"), report.load(tmp_path / "b" / "results.json"))
    assert len(rows) == 1 and rows[0]["speedup"] > 0


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out and "cpu:" in out
    device_types = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    for device_type in device_types:
        for backend, reason in dispatch.available(device_type).items():
            assert (reason or "available") in out
    cpu_section = out.split("backends for cpu tensors:")[1].split("backends for")[0]
    assert "  cuda " not in cpu_section                    # never runs CPU tensors: not listed
    if not torch.cuda.is_available():
        assert "backends for cuda tensors" not in out and "cuda: no CUDA device: " in out
    from tinyrecon import cpu_lib
    if not cpu_lib.load_error():
        assert "CPU library's threads: " + ("torch's OpenMP team" if cpu_lib.torch_openmp() else "its own") in out


def test_python_dash_m(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tinyrecon", "info"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("tinyrecon", run_name="__main__")
    assert e.value.code == 0 and "backends for cpu tensors:" in capsys.readouterr().out


def test_train_op_differentiates_w_and_bias_only():
    fns, reference = check.prepare(cases.Case("hm", "small", "train", "torch"), torch.float32, torch.device("cpu"))
    y, *grads = fns["candidate"]()
    assert [tuple(g.shape) for g in grads] == [(18,), (6,)]          # dw, dbias; x is data
    _, *ref_grads = reference()
    assert len(ref_grads) == 2
    assert len(fns["dense"]()) == 3                                   # y, dweight, dbias
