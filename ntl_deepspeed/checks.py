"""Input checks shared by every loss path: clear errors before any math or collective.

Shape and dtype checks are free (no data is read). Checks of values (label ids in range,
loss weights finite and >= 0) read data: with ``host=True`` they run on the host and name the
bad value (one synchronisation each); otherwise they are device-side asserts
(``torch._assert_async``) that never stall the host -- on CPU they raise at once, on CUDA at
the next synchronisation.
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import REDUCTIONS


def _fail_if(bad: torch.Tensor, message: str, host: bool, detail=None) -> None:
    if host:
        if bool(bad.any()):
            raise ValueError(detail() if detail is not None else message)
    else:
        torch._assert_async(~bad.any(), message)


def check_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int,
                 host: bool = True) -> None:
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 (or int32) token ids, got {labels.dtype}")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))

    def named():
        first = int(labels[bad].reshape(-1)[0])
        return (f"label id {first} is outside the vocabulary [0, {vocab_size}) and is not "
                f"ignore_index={ignore_index} ({int(bad.sum())} such labels)")

    _fail_if(bad, f"a label id is outside the vocabulary [0, {vocab_size}) and is not "
                  f"ignore_index={ignore_index} (ntl.check_inputs names it)", host, named)


def check_loss_weights(loss_weights: Optional[torch.Tensor], labels: torch.Tensor,
                       host: bool = True) -> None:
    if loss_weights is None:
        return
    if loss_weights.shape != labels.shape:
        raise ValueError(f"loss_weights {tuple(loss_weights.shape)} must have the labels' "
                         f"shape {tuple(labels.shape)}")
    _fail_if((loss_weights < 0) | ~torch.isfinite(loss_weights),
             "loss_weights must be finite and >= 0", host)


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {REDUCTIONS}")


def check_logits(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if not torch.is_floating_point(logits):
        raise TypeError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not "
                         "match: expected logits [..., vocab] and labels [...]")


def check_head(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               labels: torch.Tensor) -> None:
    if not torch.is_floating_point(hidden):
        raise TypeError(f"hidden must be a floating-point tensor, got {hidden.dtype}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not "
                         "match: expected hidden [..., H] and labels [...]")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be [V_local, {hidden.shape[-1]}]")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias {tuple(bias.shape)} must be [{weight.shape[0]}]")
