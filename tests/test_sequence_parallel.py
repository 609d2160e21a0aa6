"""DeepSpeed Ulysses sequence parallelism with NTL, real 2-rank launches (SP 2, CPU, gloo):
the loss, CE, NTL and the gradient of every parameter equal the unsplit model's (one process,
F.cross_entropy + ntl_loss, autograd) on the same batch -- through ntl_deepspeed.initialize
(ZeRO 1/2/3, every normalisation, materialised logits and the fused head; also SP 2 x DP 2 on 4
ranks), through NTLTrainer with ParallelismConfig(sp_backend="deepspeed"), and in our trainer
(--sequence-parallel 2 vs 1 rank). Layouts that cannot work stop at start-up."""
import json
import os
import re
import subprocess
import sys

import pytest

from dist_utils import free_port
from ntl_deepspeed import NTLConfig
from ntl_deepspeed.integrations.sequence_parallel import (check_config_has_groups,
                                                          check_sequence_parallel)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "sequence_parallel.py")


def _launch(tmp_path, mode, ranks=2):
    out = tmp_path / "result.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=ROOT, PATH=os.path.dirname(sys.executable) + os.pathsep
               + os.environ.get("PATH", ""))
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_addr", "127.0.0.1", "--master_port",
           str(free_port()), SCRIPT, mode, str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def _check_case(result, *, fused: bool):
    ours, ref = result["ours"], result["reference"]
    assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-6)  # rank 0's replica
    assert ours["ce"] == pytest.approx(ref["ce_all"], rel=1e-6)  # metrics: all ranks' tokens
    assert ours["ntl"] == pytest.approx(ref["ntl_all"], rel=1e-5)  # per number label
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
        assert result["per_rank_loss"][0] == result["per_rank_loss"][1]  # the whole micro-batch's


def test_sp2_x_dp2_equals_two_unsplit_replicas(tmp_path):
    """4 ranks: two data replicas of SP 2, each with its own rows. Each rank's loss is its
    replica's micro-batch loss; gradients are the replicas' mean (``global``: NTL over both
    replicas' number labels), under ZeRO 1/2/3."""
    results = _launch(tmp_path, "loop", ranks=4)
    assert set(results) == {"dp2_zero1_global", "dp2_zero3_global", "dp2_zero2"}
    for name, result in results.items():
        _check_case(result, fused=False)
        losses, refs = result["per_rank_loss"], result["per_rank_ref"]
        assert losses == pytest.approx(refs, rel=1e-6)
        assert losses[0] == losses[1] != losses[2] == losses[3]  # SP groups {0,1}, {2,3}


def test_ntl_trainer_sp2_equals_the_unsplit_model(tmp_path):
    result = _launch(tmp_path, "trainer")["trainer"]
    _check_case(result, fused=False)


def test_stock_trainer_with_install_sp2_equals_the_unsplit_model(tmp_path):
    """The stock Trainer re-weights each SP rank's loss by its valid tokens; ``install``
    replaces that for NTL models (ignored labels sit in the first slice only, so the slices hold
    different numbers of labelled tokens: re-weighted, the gradients would be wrong)."""
    result = _launch(tmp_path, "plain_trainer")["trainer"]
    ours, ref = result["ours"], result["reference"]
    assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert len(result["grad_rel_err"]) == 12
    assert max(result["grad_rel_err"].values()) < 1e-5, result["grad_rel_err"]


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
            "tensor_parallel": {"autotp_size": 2}, "ntl": {}},
            vocab=ntl_deepspeed.NumberVocab.from_tokens([str(i) for i in range(10)]))


@pytest.mark.parametrize("variant", ["plain", "grad_accumulation", "resume"])
def test_our_trainer_sp2_equals_one_rank(tmp_path, variant):
    """ntl-pretrain --sequence-parallel 2 (ZeRO-3, 2 ranks sharing each sequence) vs the same
    job on 1 rank: the same micro-batches, so the same loss, CE and NTL at every step. SGD
    without clipping: a wrong gradient scale would change the later steps. Also with 2
    micro-batches per step, and with the SP run stopped after step 1 and resumed."""
    from launch_utils import TINY, command, env, losses_by_step, metrics

    with open(TINY) as f:
        config = json.load(f)
    config.pop("scheduler")
    config.update(gradient_clipping=0.0, zero_allow_untested_optimizer=True,
                  optimizer={"type": "SGD", "params": {"lr": 0.5}})
    if variant == "grad_accumulation":
        config.update(gradient_accumulation_steps=2)
    path = tmp_path / "sgd.json"
    path.write_text(json.dumps(config))

    def run(ranks, *extra):
        out = tmp_path / f"ranks{ranks}"
        proc = subprocess.run(command(out, *extra, config=str(path), ranks=ranks),
                              cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        run.output = proc.stdout + proc.stderr
        return out

    sp = ["--sequence-parallel", "2"]
    if variant == "resume":
        run(2, "--steps", "2", *sp)
        run(2, "--steps", "3", "--no-save", "--resume", *sp)
        assert re.search(r"--resume: continuing from \S*step2\b", run.output), run.output[-2000:]
    else:
        run(2, "--steps", "3", "--no-save", *sp)
    rows = {2: metrics(tmp_path / "ranks2"), 1: metrics(run(1, "--steps", "3", "--no-save"))}
    if variant == "resume":  # the resumed run's rows: steps 0, 1, then 2 after the restart
        assert sorted(losses_by_step(tmp_path / "ranks2")) == [0, 1, 2]
        rows[2] = list({r["step"]: r for r in rows[2]}.values())
    assert [r["step"] for r in rows[2]] == [0, 1, 2]
    assert rows[2][2]["loss"] < rows[2][0]["loss"] - 0.1  # it trains
    for sp_row, one in zip(rows[2], rows[1]):
        for key in ("loss", "ce", "ntl", "number_mae", "number_accuracy"):
            assert sp_row[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), \
                (sp_row["step"], key)


def test_our_trainer_refuses_what_sp_cannot_do():
    import dataclasses

    from ntl_deepspeed.train.cli import parse_args
    from ntl_deepspeed.train.sequence_parallel import check_arguments, sequence_parallel_size

    args = parse_args(["--deepspeed_config", "ds.json", "--model", "m.json",
                       "--sequence-parallel", "2", "--eval-fraction", "0.1"])
    with pytest.raises(ValueError, match="evaluation.*not supported"):
        check_arguments(args, 2, 64, 2, 1)
    args = dataclasses.replace(args, eval_fraction=0.0)
    with pytest.raises(ValueError, match="--seq-len 63 is not a multiple"):
        check_arguments(args, 2, 63, 2, 1)
    with pytest.raises(ValueError, match="AutoTP"):
        check_arguments(args, 2, 64, 4, 2)
    check_arguments(args, 2, 64, 2, 1)
    with pytest.raises(ValueError, match='says "sequence_parallel_size": 4'):
        sequence_parallel_size(args, {"sequence_parallel_size": 4})
    assert sequence_parallel_size(dataclasses.replace(args, sequence_parallel=None),
                                  {"sequence_parallel_size": 2}) == 2


def test_preflight_names_the_sp_problem_before_any_rank_starts(tmp_path):
    from launch_utils import MODEL, TINY

    from ntl_deepspeed.train import preflight

    base = ["--deepspeed_config", TINY, "--model", MODEL]
    with pytest.raises(preflight.PreflightError, match="--seq-len 33 is not a multiple"):
        preflight.check(base + ["--sequence-parallel", "2", "--seq-len", "33"])
    with pytest.raises(preflight.PreflightError, match="evaluation"):
        preflight.check(base + ["--sequence-parallel", "2", "--eval-fraction", "0.1"])
    config = tmp_path / "sp4.json"
    config.write_text(json.dumps({**json.loads(open(TINY).read()), "sequence_parallel_size": 4}))
    with pytest.raises(preflight.PreflightError, match='says "sequence_parallel_size": 4'):
        preflight.check(["--deepspeed_config", str(config), "--model", MODEL,
                         "--sequence-parallel", "2"])
    preflight.check(base + ["--sequence-parallel", "2"])
