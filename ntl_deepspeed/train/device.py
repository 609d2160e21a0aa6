"""Accelerator, device and distributed backend of our trainer, chosen in one place.

CUDA available -> ``cuda`` / ``nccl``; otherwise ``cpu`` / ``gloo``. An explicit
``DS_ACCELERATOR`` wins (DeepSpeed reads it too, so both always agree). On CPU,
:func:`skip_shm_comm_build` spares every start DeepSpeed's shared-memory comm op JIT build.
"""
from __future__ import annotations

import os
import sys

import torch

DIST_BACKENDS = {"cuda": "nccl", "cpu": "gloo"}


def accelerator() -> str:
    explicit = os.environ.get("DS_ACCELERATOR")
    if explicit:
        return explicit
    return "cuda" if torch.cuda.is_available() else "cpu"


def backend() -> str:
    """The torch.distributed backend for :func:`accelerator` (nccl on CUDA, gloo on CPU)."""
    return DIST_BACKENDS.get(accelerator(), "gloo")


def configure() -> str:
    """Pin DeepSpeed to :func:`accelerator` (before DeepSpeed is imported) and return it."""
    name = accelerator()
    os.environ["DS_ACCELERATOR"] = name
    return name


def skip_shm_comm_build() -> None:
    """DeepSpeed JIT-compiles a shared-memory comm op (~45 s) at init on CPU; gloo needs none.
    (Patch the module object in ``sys.modules``: ``import deepspeed.comm.torch`` binds the torch
    library of the same name instead.)"""
    import importlib

    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
