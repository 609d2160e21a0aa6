"""benchmarks/pretrain_effect.py runs end to end through the real trainer (--smoke, one seed:
three 2-rank ZeRO-3 launches) and writes a valid table, JSON and plot."""
import json
import os
import subprocess
import sys

from test_deepspeed_job import ROOT, env


def test_pretrain_effect_smoke(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "pretrain_effect.py"),
                           "--smoke", "--seeds", "1", "--work-dir", str(tmp_path / "runs"),
                           "--out-dir", str(tmp_path)], cwd=ROOT, env=env(), timeout=300,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "pretrain_effect_smoke.json") as f:
        result = json.load(f)
    assert {r["loss"] for r in result["runs"]} == {"ce", "ce+ntl_was", "ce+ntl_mse"}
    for r in result["runs"]:
        assert r["gen_held_out"] and 0 <= r["number_accuracy"] <= 1 and r["number_mae"] >= 0
        assert r["ce_non_number"] > 0 and len(r["curve"]) == 2  # evals after steps 3 and 6
    # the CE run is NTL weight 0 through the same op: its training loss is its CE
    assert set(result["paired_vs_ce"]) == {"ce+ntl_was", "ce+ntl_mse"}
    md = (tmp_path / "pretrain_effect_smoke.md").read_text()
    assert "Paired differences vs CE" in md and "What separates" in md
    assert (tmp_path / "pretrain_effect_smoke.png").stat().st_size > 0
