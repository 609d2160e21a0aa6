"""End-to-end DeepSpeed ZeRO-3 runs of launch/pretrain.py on 2 CPU ranks (a few steps each)."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from dist_utils import free_port
from ntl_deepspeed.integrations.deepspeed import split_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "zero3_cpu_tiny.json")
AUTOTP = os.path.join(ROOT, "configs", "zero3_cpu_autotp2.json")
AUTOTP_DP = os.path.join(ROOT, "configs", "zero3_cpu_autotp2_dp2.json")
OFFLOAD = os.path.join(ROOT, "configs", "zero3_cpu_offload.json")
MODEL = os.path.join(ROOT, "configs", "model", "llama_tiny.json")


def env():
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
             PYTHONPATH=ROOT)
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e.get("PATH", "")
    return e


def launch(out_dir, *extra, config=TINY, timeout=240, extra_env=None, check=True, ranks=2):
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_addr", "127.0.0.1", "--master_port",
           str(free_port()), os.path.join(ROOT, "launch", "pretrain.py"), "--deepspeed_config",
           config, "--model", MODEL, "--output-dir", str(out_dir), "--no-plot", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env={**env(), **(extra_env or {})}, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def column(rows, key):
    return [r[key] for r in rows]


def variant(tmp_path, base, name, ntl=None, **top):
    """``base`` config with some ``"ntl"`` keys and top-level sections replaced."""
    with open(base) as f:
        cfg = json.load(f)
    cfg["ntl"] = {**cfg["ntl"], **(ntl or {})}
    cfg.update(top)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_dp2_autotp2_and_fused_head_same_losses_and_loss_decreases(tmp_path):
    # 512-row head: 6 vocab blocks (last short); 8 x 65 tokens: 3 token chunks (last short)
    fused = {"fused_head": True, "fused_block_size": 100, "fused_token_chunk": 200}
    runs = {"dp": TINY, "tp": AUTOTP,  # AutoTP micro-batch 16 = DP 2 x 8
            "dp_fused": variant(tmp_path, TINY, "dp_fused", fused),
            "tp_fused": variant(tmp_path, AUTOTP, "tp_fused", fused)}
    for name, config in runs.items():
        launch(tmp_path / name, "--steps", "12", config=config)
    got = {name: metrics(tmp_path / name) for name in runs}
    assert all(len(rows) == 12 for rows in got.values())
    for key in ("loss", "ce", "ntl", "number_mae"):
        if key != "loss":  # the summed loss drifts a little more between the two layouts
            assert column(got["dp"], key) == pytest.approx(column(got["tp"], key), rel=2e-4), key
        # the fused head against the materialised logits, same layout: fp32 rounding only
        for layout in ("dp", "tp"):
            assert column(got[f"{layout}_fused"], key) == pytest.approx(
                column(got[layout], key), rel=2e-5), (layout, key)
    assert got["dp"][-1]["loss"] < 0.8 * got["dp"][0]["loss"]
    assert os.path.exists(tmp_path / "dp" / "checkpoints" / "latest")


def test_fused_head_in_bf16_matches_materialised_head(tmp_path):
    # bf16 model: the fused head computes fp32 logits from bf16 hidden/weight, the materialised
    # head rounds its logits to bf16 first, so the two agree to bf16-rounding level only
    runs = {"mat": variant(tmp_path, TINY, "mat", bf16={"enabled": True}),
            "fused": variant(tmp_path, TINY, "fused", {"fused_head": True},
                             bf16={"enabled": True})}
    for name, config in runs.items():
        launch(tmp_path / name, "--steps", "8", config=config)
    for key in ("loss", "ce", "ntl"):
        assert column(metrics(tmp_path / "fused"), key) == pytest.approx(
            column(metrics(tmp_path / "mat"), key), rel=1e-3), key


def test_autotp2_x_dp2_and_cpu_offload_match_dp2(tmp_path):
    launch(tmp_path / "dp", "--steps", "4")
    launch(tmp_path / "tpdp", "--steps", "4", config=AUTOTP_DP, ranks=4)
    launch(tmp_path / "offload", "--steps", "4", config=OFFLOAD)
    for key in ("loss", "ce", "ntl"):
        for other in ("tpdp", "offload"):
            assert column(metrics(tmp_path / "dp"), key) == pytest.approx(
                column(metrics(tmp_path / other), key), rel=2e-4), (other, key)


def profiled_config(tmp_path, name, ntl=None):
    """The tiny config with DeepSpeed's flops profiler on at step 2, writing to a file."""
    return variant(tmp_path, TINY, name, ntl, flops_profiler={
        "enabled": True, "profile_step": 2, "module_depth": -1, "top_modules": 1,
        "output_file": str(tmp_path / f"{name}.txt")})


def profiled_forward_flops(path):
    with open(path) as f:
        line = next(l for l in f if l.startswith("fwd flops per GPU:"))
    value, unit = line.split(":")[1].split()
    return float(value) * {"K": 1e3, "M": 1e6, "G": 1e9}[unit]


def test_weight_zero_is_plain_cross_entropy_training_and_profiler_counts_ntl(tmp_path):
    from ntl_deepspeed.flops import ce_ntl_forward_flops

    launch(tmp_path / "zero", "--steps", "8", "--ntl-weight", "0",
           config=profiled_config(tmp_path, "zero"))
    launch(tmp_path / "plain", "--steps", "8", "--plain-ce",
           config=profiled_config(tmp_path, "plain"))
    assert column(metrics(tmp_path / "zero"), "loss") == pytest.approx(
        column(metrics(tmp_path / "plain"), "loss"), rel=1e-5)
    # the engine's profile (rank 0, step 2) holds the op's flops; HF's CE is invisible to it.
    # 8 x 65 labels, 512-token vocab (10 digits): 1.11 M; the profile prints 2 decimals
    added = profiled_forward_flops(tmp_path / "zero.txt") - profiled_forward_flops(
        tmp_path / "plain.txt")
    assert added == pytest.approx(ce_ntl_forward_flops(8 * 65, 512, 10), abs=0.011e6)
    # fused head (gradients computed in its forward): its block matmuls replace the head's
    # linear (same flops), the number-token logits are read from those blocks, and the gradient
    # GEMMs (in-place addmm_) are not booked as forward work: the profile equals the plain one
    launch(tmp_path / "fused", "--steps", "8", "--ntl-weight", "0",
           config=profiled_config(tmp_path, "fused", {"fused_head": True}))
    assert column(metrics(tmp_path / "fused"), "loss") == pytest.approx(
        column(metrics(tmp_path / "plain"), "loss"), rel=1e-5)
    extra = profiled_forward_flops(tmp_path / "fused.txt") - profiled_forward_flops(
        tmp_path / "zero.txt")
    assert extra == pytest.approx(0, abs=0.011e6)


def test_resume_continues_exactly(tmp_path):
    launch(tmp_path / "full", "--steps", "10")
    launch(tmp_path / "part", "--steps", "5")
    launch(tmp_path / "part", "--steps", "10", "--resume")
    full, resumed = metrics(tmp_path / "full"), metrics(tmp_path / "part")
    assert column(resumed, "step") == list(range(10))
    assert column(resumed, "loss") == pytest.approx(column(full, "loss"), rel=1e-6)


def test_dead_worker_fails_the_launch_quickly(tmp_path):
    t0 = time.monotonic()
    proc = launch(tmp_path / "dead", "--steps", "50", extra_env={"NTL_DEBUG_EXIT": "1:2"},
                  check=False, timeout=180)
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 120


@pytest.mark.parametrize("section,message", [
    ({"weight": -1}, "ntl.weight"),
    ({"kind": "rmse"}, "ntl.kind"),
    ({"lambda": 0.3}, "ntl.lambda"),
    ({"wieght": 0.3}, "did you mean 'weight'"),
    ({"reweigh": "yes"}, "ntl.reweigh"),
    ({"squash_factor": 0.5}, "ntl.squash_factor"),
    ({"kind": "mse", "squash_factor": 3}, "squash_factor applies to kind 'was' only"),
    ({"mode": "roman"}, "ntl.mode"),
])
def test_bad_ntl_section_names_the_key(section, message):
    with pytest.raises(ValueError, match=message):
        split_config({"ntl": section})


def test_bad_ntl_section_stops_the_launch(tmp_path):
    with open(TINY) as f:
        cfg = json.load(f)
    cfg["ntl"]["weight"] = "heavy"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(cfg))
    proc = launch(tmp_path / "bad", "--steps", "2", config=str(bad), check=False, timeout=120)
    assert proc.returncode != 0
    assert "ntl.weight" in proc.stdout + proc.stderr


def test_mpirun_and_hostfile_launchers_agree(tmp_path):
    if shutil.which("mpirun") is None:
        pytest.fail("mpirun not installed (launch/setup_env.sh installs openmpi-bin)")
    e = {**env(), "NP": "2", "MASTER_PORT": str(free_port())}
    subprocess.run(["bash", os.path.join(ROOT, "launch", "run_mpi.sh"), "--steps", "4",
                    "--output-dir", str(tmp_path / "mpi"), "--no-plot"], cwd=ROOT, env=e,
                   check=True, capture_output=True, timeout=240)
    port = str(free_port())
    nodes = [subprocess.Popen(["bash", os.path.join(ROOT, "launch", "run_multinode.sh"),
                               "--steps", "4", "--output-dir", str(tmp_path / "mn"), "--no-plot"],
                              cwd=ROOT, env={**env(), "HOSTFILE": os.path.join(
                                  ROOT, "launch", "hostfile.example"), "NODE_RANK": str(r),
                                  "MASTER_PORT": port}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for r in (1, 0)]
    try:
        assert [p.wait(timeout=240) for p in nodes] == [0, 0]
    finally:
        for p in nodes:
            p.kill()
    assert column(metrics(tmp_path / "mpi"), "loss") == pytest.approx(
        column(metrics(tmp_path / "mn"), "loss"), rel=1e-6)
