"""Run a function on N real processes joined by a gloo group (CPU), failing fast on hangs."""
from __future__ import annotations

import contextlib
import datetime
import functools
import os
import socket
import sys
import time

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, pg_timeout=60.0):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size,
                            timeout=datetime.timedelta(seconds=pg_timeout))
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
    # skip the interpreter's teardown: gloo's threads sometimes abort a process there after
    # all work is done (shared/FACTS.md); a failure above still raises (spawn reports it)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn, world_size: int, *args, timeout: float = 240.0,
                    pg_timeout: float = 60.0) -> None:
    """``fn(rank, world_size, *args)`` on ``world_size`` processes; raises if any fails, kills
    all of them when ``timeout`` seconds pass. ``pg_timeout``: the process group's timeout (a
    collective some rank never joins fails after it)."""
    ctx = mp.start_processes(_entry, args=(world_size, free_port(), fn, args, pg_timeout),
                             nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"distributed test did not finish within {timeout} s")


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "all_to_all", "all_to_all_single",
               "reduce", "gather", "scatter", "barrier")


@contextlib.contextmanager
def recorded_collectives():
    """Yields a list that receives the name of every ``torch.distributed`` collective called
    inside the block (the functions are wrapped, then restored)."""
    calls, originals = [], {name: getattr(dist, name) for name in COLLECTIVES}
    for name, fn in originals.items():
        @functools.wraps(fn)
        def wrapped(*a, _fn=fn, _name=name, **k):
            calls.append(_name)
            return _fn(*a, **k)

        setattr(dist, name, wrapped)
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def end_launched_worker() -> None:
    """End a worker of a launcher (deepspeed, mpirun) once its results are written: barrier,
    destroy the process group, flush, ``os._exit(0)`` -- gloo can otherwise abort the process at
    interpreter exit after correct output."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)
