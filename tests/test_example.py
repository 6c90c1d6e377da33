"""The examples' smoke runs: each trains every function and checks its own result (its exit status);
in the synthetic one every layer starts within 10x of the dense layer's loss (ReconciledLinear's init="linear")."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinyrecon.registry import CLASSES

SCRIPT = Path(__file__).parents[1] / "examples" / "train_synthetic.py"


def test_train_synthetic_smoke():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = {line.split()[0] for line in run.stdout.splitlines()[2:]}
    assert {"dense", "identity", "lorr(r=2)", "hm", "lphm(r=2)", "dual_lphm(r=2)", "duplicated_padding(p=2)",
            "masking(p=0.5)", "random_matrix_adaption(r=4)", "hypernet(l=64)",
            "random_matrix_hypernet(l=64)"} <= rows
    loss0 = {line.split()[0]: float(line.split()[-3]) for line in run.stdout.splitlines()[2:] if line.strip()}
    for name, loss in loss0.items():
        assert loss < 10 * loss0["dense"], (name, loss, run.stdout)


def test_digits_rpn_smoke(tmp_path):
    pytest.importorskip("sklearn", reason="examples/digits_rpn.py needs scikit-learn (pip install tinyrecon[examples])")
    script = SCRIPT.parent / "digits_rpn.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout + run.stderr   # 1: the dense baseline did not learn
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["function"] for r in results] == ["dense nn.Linear", *CLASSES]
    assert all(0 <= r["acc_mean"] <= 1 and r["params"] > 0 for r in results)
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    assert "| hm |" in (tmp_path / "results.md").read_text()
