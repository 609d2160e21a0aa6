"""Input checks shared by every loss path: clear errors before any math or collective."""
from __future__ import annotations

from typing import Optional

import torch

from .config import REDUCTIONS


def check_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 (or int32) token ids, got {labels.dtype}")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        first = int(labels[bad].reshape(-1)[0])
        raise ValueError(f"label id {first} is outside the vocabulary [0, {vocab_size}) and is not "
                         f"ignore_index={ignore_index} ({int(bad.sum())} such labels)")


def check_shapes(logits: torch.Tensor, labels: torch.Tensor,
                 loss_weights: Optional[torch.Tensor], reduction: str) -> None:
    if not torch.is_floating_point(logits):
        raise TypeError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not "
                         "match: expected logits [..., vocab] and labels [...]")
    if loss_weights is not None:
        if loss_weights.shape != labels.shape:
            raise ValueError(f"loss_weights {tuple(loss_weights.shape)} must have the labels' "
                             f"shape {tuple(labels.shape)}")
        if bool((loss_weights < 0).any()) or not bool(torch.isfinite(loss_weights).all()):
            raise ValueError("loss_weights must be finite and >= 0")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {REDUCTIONS}")


def count_nonfinite(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t)).sum())
