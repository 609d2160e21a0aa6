"""Real 2-rank DeepSpeed launches of launch/pretrain.py for the reliability tests: small and fast
(tiny Llama, ZeRO-3 on CPU, a 2000-sentence corpus, 32-token sequences)."""
import json
import os
import subprocess
import sys
import time

from dist_utils import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "zero3_cpu_tiny.json")
MODEL = os.path.join(ROOT, "configs", "model", "llama_tiny.json")
FAST = ("--corpus-sentences", "2000", "--seq-len", "32", "--no-plot")


def env(**extra):
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
             PYTHONPATH=ROOT, **extra)
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e.get("PATH", "")
    return e


def command(out_dir, *extra, config=TINY, ranks=2):
    return ["deepspeed", "--num_gpus", str(ranks), "--master_addr", "127.0.0.1", "--master_port",
            str(free_port()), os.path.join(ROOT, "launch", "pretrain.py"), "--deepspeed_config",
            config, "--model", MODEL, "--output-dir", str(out_dir), *FAST, *extra]


def launch(out_dir, *extra, extra_env=None, check=True, timeout=240, config=TINY):
    proc = subprocess.run(command(out_dir, *extra, config=config), cwd=ROOT,
                          env=env(**(extra_env or {})), capture_output=True, text=True,
                          timeout=timeout)
    proc.output = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}):\n{proc.output[-5000:]}")
    return proc


def start(out_dir, *extra, extra_env=None, log=None):
    """A launch in the background (its own session: the test can always clean it up)."""
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(command(out_dir, *extra), cwd=ROOT, env=env(**(extra_env or {})),
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def metrics(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses_by_step(out_dir):
    """{step: loss}, the last row of each step (a resumed run repeats the steps it redoes)."""
    return {row["step"]: row["loss"] for row in metrics(out_dir)}


def wait_for(condition, timeout, what, poll=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def workers(launcher_pid):
    """The training processes under a launcher: ``{local_rank: psutil.Process}``."""
    import psutil

    found = {}
    try:
        children = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return found
    for p in children:
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        for arg in cmd:
            if arg.startswith("--local_rank="):
                found[int(arg.split("=")[1])] = p
    return found


def gone(process) -> bool:
    """Exited (a zombie waiting for its reaper counts as exited)."""
    import psutil

    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_all(processes) -> None:
    """Clean-up of the processes a test started (by pid)."""
    import psutil

    for p in processes:
        try:
            p.kill()
        except (psutil.Error, ProcessLookupError, OSError):
            pass
