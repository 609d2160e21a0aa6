"""Accelerator, device and distributed backend, chosen in one place.

CUDA available -> ``cuda`` / ``nccl``; otherwise ``cpu`` / ``gloo``. An explicit
``DS_ACCELERATOR`` wins (DeepSpeed reads it too, so both always agree).
"""
from __future__ import annotations

import os

import torch

BACKENDS = {"cuda": "nccl", "cpu": "gloo"}


def accelerator() -> str:
    explicit = os.environ.get("DS_ACCELERATOR")
    if explicit:
        return explicit
    return "cuda" if torch.cuda.is_available() else "cpu"


def backend() -> str:
    """The torch.distributed backend for :func:`accelerator` (nccl on CUDA, gloo on CPU)."""
    return BACKENDS.get(accelerator(), "gloo")


def configure() -> str:
    """Pin DeepSpeed to :func:`accelerator` (before DeepSpeed is imported) and return it."""
    name = accelerator()
    os.environ["DS_ACCELERATOR"] = name
    return name
