"""benchmarks/arithmetic.py runs end to end (tiny: 1 seed, 20 steps) and writes valid output."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_arithmetic_quick(tmp_path):
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "arithmetic.py"), "--quick",
                    "--workers", "1", "--out-dir", str(tmp_path)], check=True, timeout=300,
                   capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    with open(tmp_path / "arithmetic_quick.json") as f:
        result = json.load(f)
    assert {r["loss"] for r in result["runs"]} == {"ce", "ce+ntl_mse", "ce+ntl_was"}
    for r in result["runs"]:
        assert 0 <= r["digit_accuracy"] <= 1 and r["mae"] >= 0 and r["steps"] == 20
    assert (tmp_path / "arithmetic_quick.png").stat().st_size > 0
    assert "Paired differences" in (tmp_path / "arithmetic_quick.md").read_text()
