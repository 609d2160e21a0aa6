"""Bringing our trainer's distributed job up and down: joining the process group (saying what
it waits for), the tokenizer every rank shares, the model under ZeRO-3 and its engine, and how a
worker ends (cleanly, for gloo and MPI)."""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

import torch.distributed as dist

from . import sequence_parallel
from .activity import Activity


def init_distributed(mpi: bool, timeout: Optional[float] = None) -> None:
    """``timeout`` (seconds, ``--dist-timeout``): of every collective, so that a stalled rank
    fails the run instead of hanging it (torch's default: 30 minutes)."""
    import datetime

    import deepspeed

    from .device import backend, skip_shm_comm_build

    skip_shm_comm_build()
    extra = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
    deepspeed.init_distributed(dist_backend=backend(), auto_mpi_discovery=mpi, **extra)


def join_process_group(mpi: bool, timeout: float, activity: Activity) -> float:
    """:func:`init_distributed`, saying first what it waits for (every rank of every node at the
    rendezvous address, up to ``timeout``); the seconds it took. The ``activity`` thread repeats
    it while the wait lasts (a node that never starts)."""
    world = os.environ.get("WORLD_SIZE", "?")
    node = os.environ.get("CROSS_RANK", os.environ.get("GROUP_RANK"))  # deepspeed / torchrun
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    what = (f"joining the process group: waiting for all {world} ranks to connect to {where}"
            " (every node's launcher must be started)")
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"[rank {os.environ.get('RANK', '?')}{'' if node is None else f', node {node}'}] "
              f"{what}; giving up after --dist-timeout {timeout:g} s", file=sys.stderr,
              flush=True)
    activity.now(what)
    t0 = time.monotonic()
    init_distributed(mpi, timeout)
    activity.now("setting up (tokenizer, data, model, DeepSpeed engine)")
    seconds = time.monotonic() - t0
    if dist.get_rank() == 0:
        print(f"all {dist.get_world_size()} ranks joined in {seconds:.1f} s", file=sys.stderr,
              flush=True)
    return seconds


def shared_corpus_tokenizer(seed: int) -> str:
    """The embedded corpus' sentencepiece model: rank 0 trains it (cached), the others wait."""
    from .data.tokenizer import train_tokenizer

    if dist.get_rank() == 0:
        train_tokenizer(seed=seed)
    dist.barrier()
    return train_tokenizer(seed=seed)


def build_engine(model_config_path: str, vocab_size: int, ds_config: dict, sp_size: int = 1,
                 seq_len: Optional[int] = None):
    """A causal LM from a model config JSON under ZeRO-3's ``zero.Init`` (through
    ``HfDeepSpeedConfig``, which keeps HF's initialisation; keep it alive), its engine, and the
    Ulysses ``mpu`` (None without sequence parallelism)."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from .models import model_config  # any HF causal LM: "model_type" (default llama)

    hf_ds_config = HfDeepSpeedConfig(ds_config)
    model = AutoModelForCausalLM.from_config(model_config(model_config_path, vocab_size))
    mpu = None
    if sp_size > 1:
        mpu = sequence_parallel.register(model, sp_size,
                                         ds_config["train_micro_batch_size_per_gpu"], seq_len)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=ds_config, mpu=mpu)
    return engine, hf_ds_config, mpu


def pad_vocab(size: int, multiple: int) -> int:
    return (size + multiple - 1) // multiple * multiple


def exit_worker(code: int) -> None:
    """End a worker for good. On success: barrier, destroy the process group, finalize MPI
    (gloo can abort at interpreter exit otherwise); always flush and ``os._exit``."""
    sys.stdout.flush()
    sys.stderr.flush()
    if code == 0:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        if "mpi4py" in sys.modules:
            from mpi4py import MPI

            if MPI.Is_initialized() and not MPI.Is_finalized():
                MPI.Finalize()
    sys.stdout.flush()
    os._exit(code)
