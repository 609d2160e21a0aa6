"""DeepSpeed Ulysses sequence parallelism with NTL, real 2-rank launches (SP 2, CPU, gloo):
the loss, CE, NTL and the gradient of every parameter equal the unsplit model's (one process,
F.cross_entropy + ntl_loss, autograd) on the same batch -- through ntl_deepspeed.initialize
(ZeRO 1/2/3, every normalisation, materialised logits and the fused head) and through
NTLTrainer with ParallelismConfig(sp_backend="deepspeed"). Layouts that cannot work stop at
start-up."""
import json
import os
import subprocess
import sys

import pytest

from dist_utils import free_port
from ntl_deepspeed import NTLConfig
from ntl_deepspeed.integrations.sequence_parallel import (check_config_has_groups,
                                                          check_sequence_parallel)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "sequence_parallel.py")


def _launch(tmp_path, mode):
    out = tmp_path / "result.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=ROOT, PATH=os.path.dirname(sys.executable) + os.pathsep
               + os.environ.get("PATH", ""))
    cmd = ["deepspeed", "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port",
           str(free_port()), SCRIPT, mode, str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def _check_case(result, *, fused: bool):
    ours, ref = result["ours"], result["reference"]
    assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert ours["ce"] == pytest.approx(ref["ce"], rel=1e-6)  # metrics over the SP group
    assert len(result["grad_rel_err"]) == 12                  # every parameter of the model
    worst = max(result["grad_rel_err"].values())
    assert worst < 1e-5, result["grad_rel_err"]
    if "logits_materialised" in ours:
        assert ours["logits_materialised"] is not fused
        assert ours["slice_tokens"] == 6                     # each rank: half of 12 positions


def test_initialize_sp2_equals_the_unsplit_model(tmp_path):
    results = _launch(tmp_path, "loop")
    assert set(results) == {"zero1", "zero2_global", "zero3", "zero3_fused_token",
                            "zero1_fused"}
    for name, result in results.items():
        _check_case(result, fused="fused" in name)
        if "token" not in name:  # the metric is NTL per number label
            assert result["ours"]["ntl"] == pytest.approx(result["reference"]["ntl"], rel=1e-5)


def test_ntl_trainer_sp2_equals_the_unsplit_model(tmp_path):
    result = _launch(tmp_path, "trainer")["trainer"]
    _check_case(result, fused=False)
    assert result["ours"]["ntl"] == pytest.approx(result["reference"]["ntl"], rel=1e-5)


def test_layouts_that_cannot_work_stop_at_start_up():
    config = NTLConfig()
    with pytest.raises(ValueError, match="with AutoTP is not supported"):
        check_sequence_parallel(config, 2, vocab_parallel_head=True)
    with pytest.raises(ValueError, match="PipelineModule"):
        check_sequence_parallel(config, 2, vocab_parallel_head=False, pipeline=True)
    with pytest.raises(ValueError, match="number_level.*straddle"):
        check_sequence_parallel(NTLConfig(kind="number_level"), 2, vocab_parallel_head=False)
    check_sequence_parallel(NTLConfig(kind="number_level"), 1, vocab_parallel_head=True)
    with pytest.raises(ValueError, match="no mpu was passed"):
        check_config_has_groups({"sequence_parallel_size": 2}, None)


def test_initialize_refuses_sp_with_autotp_before_deepspeed():
    import torch

    import ntl_deepspeed

    with pytest.raises(ValueError, match="with AutoTP is not supported"):
        ntl_deepspeed.initialize(torch.nn.Linear(2, 2), {
            "sequence_parallel_size": 2, "data_parallel_size": 1,
            "tensor_parallel": {"autotp_size": 2}, "ntl": {}}, vocab=object())
