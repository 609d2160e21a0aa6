"""launch/run_*.sh check the command (ntl_deepspeed.train.preflight) before starting any rank:
a bad config costs one line and a few seconds, not a job start."""
import json
import os
import subprocess
import time

import pytest

from dist_utils import free_port
from ntl_deepspeed.train import preflight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "zero3_cpu_tiny.json")
MODEL = os.path.join(ROOT, "configs", "model", "llama_tiny.json")
LAUNCHERS = {
    "run_pretrain.sh": {},
    "run_mpi.sh": {},
    "run_multinode.sh": {"HOSTFILE": os.path.join(ROOT, "launch", "hostfile.example"),
                         "NODE_RANK": "0"},
}


@pytest.fixture(scope="module")
def environment():
    """setup_env.sh once, untimed: the launches below then find its stamp and install nothing."""
    subprocess.run(["bash", "-c", f"source {ROOT}/launch/setup_env.sh"], check=True,
                   timeout=1800)


def launch(script, tmp_path, *args, **env):
    e = dict(os.environ, MASTER_PORT=str(free_port()), **LAUNCHERS[script], **env)
    start = time.monotonic()
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch", script),
                           "--output-dir", str(tmp_path / "out"), "--steps", "2", *args],
                          cwd=str(tmp_path), env=e, capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - start


def assert_stopped_before_ranks(proc, seconds, tmp_path):
    """Exit 2, exactly one line "error: ..." on stderr, no traceback, no rank, fast."""
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "spawned" not in proc.stdout + proc.stderr  # the deepspeed launcher never ran
    assert not (tmp_path / "out").exists()
    assert seconds < 30
    return lines[0]


@pytest.mark.parametrize("script", sorted(LAUNCHERS))
def test_bad_ntl_key_stops_the_launch(environment, script, tmp_path):
    with open(TINY) as f:
        config = json.load(f)
    config["ntl"]["wieght"] = 0.3
    bad = tmp_path / "my_ds_config.json"
    bad.write_text(json.dumps(config))
    proc, seconds = launch(script, tmp_path, DS_CONFIG=str(bad))
    line = assert_stopped_before_ranks(proc, seconds, tmp_path)
    assert str(bad) in line and "ntl.wieght" in line and "did you mean 'weight'" in line, line


def test_missing_model_config_is_named(environment, tmp_path):
    missing = tmp_path / "no_such_model.json"
    proc, seconds = launch("run_pretrain.sh", tmp_path, MODEL_CONFIG=str(missing))
    line = assert_stopped_before_ranks(proc, seconds, tmp_path)
    assert line == f"error: --model {missing}: no such file"


def test_relative_config_paths_are_the_callers(environment, tmp_path):
    (tmp_path / "broken.json").write_text('{"train_micro_batch_size_per_gpu": 8,')
    proc, seconds = launch("run_pretrain.sh", tmp_path, DS_CONFIG="broken.json")
    line = assert_stopped_before_ranks(proc, seconds, tmp_path)
    assert line.startswith("error: --deepspeed_config broken.json: not valid JSON"), line


def test_bad_argument_is_one_line(environment, tmp_path):
    proc, seconds = launch("run_pretrain.sh", tmp_path, "--seq-len", "many")
    line = assert_stopped_before_ranks(proc, seconds, tmp_path)
    assert line.startswith("error: argument --seq-len: ") and "'many'" in line, line


# ---------------------------------------------------------------- the preflight itself
def check(capsys, *args, config=TINY, model=MODEL):
    code = preflight.main(["--deepspeed_config", str(config), "--model", str(model), *args])
    out, err = capsys.readouterr()
    assert out == ""
    return code, err.strip()


def test_good_command_is_silent(capsys):
    assert check(capsys) == (0, "")


@pytest.mark.parametrize("content, message", [
    ('{"ntl": {"weight": "heavy"}}', 'invalid "ntl" section of {path}: ntl.weight: expected a '
                                     "number, got 'heavy'"),
    ('{"ntl": {"kind": "wass"}}', 'invalid "ntl" section of {path}: ntl.kind='),
    ('{"ntl": ', "--deepspeed_config {path}: not valid JSON"),
    ("[]", "--deepspeed_config {path}: expected a JSON object"),
])
def test_bad_deepspeed_config(capsys, tmp_path, content, message):
    path = tmp_path / "ds.json"
    path.write_text(content)
    code, err = check(capsys, config=path)
    assert code == 2 and err.startswith("error: " + message.format(path=path)), err


def test_bad_model_config_and_overrides(capsys, tmp_path):
    (tmp_path / "list.json").write_text("[1, 2]")
    assert check(capsys, model=tmp_path / "list.json") == (
        2, f"error: --model {tmp_path / 'list.json'}: expected a JSON object, got list")
    assert check(capsys, "--ntl-weight", "-1") == (
        2, "error: --ntl-weight: ntl.weight=-1.0: must be >= 0")
    code, err = check(capsys, "--tokenizer", str(tmp_path / "tok.model"))
    assert code == 2 and str(tmp_path / "tok.model") in err and "no such file" in err
    (tmp_path / "tokenizer.json").write_text("{}")
    code, err = check(capsys, "--tokenizer", str(tmp_path))
    assert code == 2 and err.startswith(f"error: --tokenizer {tmp_path}: ")
    assert check(capsys, "--resume", "--output-dir", str(tmp_path)) == (
        2, f"error: --resume: no checkpoint directory {tmp_path / 'checkpoints'}")
    code, err = check(capsys, "--data", str(tmp_path / "corpus.txt"))
    assert code == 2 and err.startswith(f"error: --data {tmp_path / 'corpus.txt'}: "), err
    (tmp_path / "corpus.txt").write_text("I paid 48 dollars\n")
    assert check(capsys, "--data", str(tmp_path / "corpus.txt")) == (0, "")


def test_real_tokenizer_passes(capsys, mistral_model_path):
    assert check(capsys, "--tokenizer", mistral_model_path) == (0, "")
