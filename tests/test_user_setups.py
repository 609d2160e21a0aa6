"""NTL added to a user's own training setup, real 2-rank launches (DeepSpeed ZeRO-3, CPU):
a plain loop with ``ntl_deepspeed.initialize`` and HF ``Trainer`` (``NTLTrainer``), data parallel
and AutoTP's vocab-parallel head. The first step's loss, CE and NTL equal the reference on the
same weights and rows (the model's own logits + F.cross_entropy + ntl_loss, one process): one
``"ntl"`` section, the same NTL strength everywhere."""
import json
import os
import subprocess
import sys

import pytest

from dist_utils import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "user_setups.py")


@pytest.mark.parametrize("mode,autotp", [("loop", False), ("loop", True), ("trainer", False),
                                         ("trainer", True)])
def test_first_step_equals_the_reference(tmp_path, mode, autotp):
    out = tmp_path / "result.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=ROOT, PATH=os.path.dirname(sys.executable) + os.pathsep
               + os.environ.get("PATH", ""))
    cmd = ["deepspeed", "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port",
           str(free_port()), SCRIPT, mode, str(out)] + (["--autotp"] if autotp else [])
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    ours, ref = result["ours"], result["reference"]
    assert ours["vocab_parallel"] == autotp
    for key in ("loss", "ce", "ntl"):
        assert ours[key] == pytest.approx(ref[key], rel=1e-5), key
    assert 0 <= ours["number_accuracy"] <= 1 and ours["number_mae"] > 0  # logged metrics
