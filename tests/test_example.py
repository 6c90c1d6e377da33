"""examples/train_synthetic.py --smoke runs, trains every family and converges (its exit status),
and every layer starts within 10x of the dense layer's loss (ReconciledLinear's init="linear")."""
import os
import subprocess
import sys
from pathlib import Path

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
