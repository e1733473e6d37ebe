"""Runs examples/train_digits.py (dmlkern vs PML on scikit-learn digits) in a subprocess."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_digits_matches_pml():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "train_digits.py"), "--epochs", "3"],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout[-3000:]
    result = json.loads(lines[0][len("RESULT "):])
    assert result["steps"] >= 20
    # The dmlkern run goes through the fused C++ engine (MultiSimilarityMiner's lazy pairs mined
    # in the kernel), not the materialising reference.
    assert result["paths_dmlkern"] == ["cpp"], result["paths_dmlkern"]
    assert result["max_abs_loss_diff"] <= 1e-4
    assert result["recall_at_1_dmlkern"] > 0.5
    assert abs(result["recall_at_1_dmlkern"] - result["recall_at_1_pml"]) < 1e-2
    curve = result["loss_curve_dmlkern"]
    assert curve[-1] < curve[0]  # it learns
