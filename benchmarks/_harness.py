"""What every benchmark shares: timing a step, free ports, spawning gloo ranks, running child
processes (a failure shows the child's own error), launching our trainer, writing results."""
from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mistral_tokenizer() -> str:
    import mistral_common

    return glob.glob(os.path.join(os.path.dirname(mistral_common.__file__), "data",
                                  "tokenizer.model.v1"))[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seconds(step: Callable[[], object]) -> float:
    """Wall time of one call of ``step`` (inputs prepared by the caller, outside it)."""
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def _rank_main(rank: int, worker, world: int, port: int, args: tuple, out_path: str) -> None:
    worker(rank, world, port, *args, out_path)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    # skip the interpreter's teardown: gloo's threads sometimes abort a finished process there
    # ("terminate called without an active exception"); a failure above still raises
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(worker, world: int, *args):
    """Run ``worker(rank, world, port, *args, out_path)`` on ``world`` spawned processes (gloo on
    ``port``; the process group is ended here after ``worker`` returns); returns the JSON that
    rank 0 wrote to ``out_path``."""
    import torch.multiprocessing as mp

    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        mp.start_processes(_rank_main, args=(worker, world, free_port(), args, tmp.name),
                           nprocs=world, start_method="spawn")
        with open(tmp.name) as f:
            return json.load(f)


def child_error(stdout: str, stderr: str, limit: int = 6000) -> str:
    """What a failed child said about its failure: its last Python traceback (stderr, else
    stdout) to the end, else the tails of both streams."""
    aborts = [line for line in (stderr or "").splitlines()  # a C++ abort leaves no traceback
              if line.startswith(("terminate called", "Fatal Python error"))]
    for text in (stderr or "", stdout or ""):
        at = text.rfind("Traceback (most recent call last)")
        if at >= 0:
            return "\n".join(aborts + [text[at:][-limit:]])
    return f"stdout (tail):\n{(stdout or '')[-limit // 2:]}\nstderr (tail):\n{(stderr or '')[-limit // 2:]}"


def run_child(cmd, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd)`` capturing its output; a non-zero exit raises with the child's own
    error (:func:`child_error`), not just its exit status."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited with status {proc.returncode}:\n"
                           f"{child_error(proc.stdout, proc.stderr)}")
    return proc


def run_pretrain(out_dir: str, config: str, model: str, *extra: str, ranks: int = 2,
                 timeout: float = 1800) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=ROOT)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_addr", "127.0.0.1", "--master_port",
           str(free_port()), os.path.join(ROOT, "launch", "pretrain.py"), "--deepspeed_config",
           config, "--model", model, "--output-dir", out_dir, "--no-plot", "--no-save", *extra]
    run_child(cmd, cwd=ROOT, env=env, timeout=timeout)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    with open(os.path.join(out_dir, "run_info.json")) as f:
        info = json.load(f)
    return {"rows": rows, "info": info}


def write_json(result: dict, path: str) -> None:
    """Write a benchmark's result and echo it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
