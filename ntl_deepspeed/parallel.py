"""Process-group facts every path needs, in one place (no group = one rank)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist


def group_size_rank(group) -> Tuple[int, int]:
    """(size, rank) of ``group``; (1, 0) without a group or without torch.distributed."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def group_size(group) -> int:
    return group_size_rank(group)[0]


@dataclass(frozen=True)
class SequenceParallel:
    """A sequence-parallel group (each rank holds a slice of the same sequences) and how the
    framework reduces gradients over it: summed (DeepSpeed ZeRO 0-2) or averaged (ZeRO-3)."""

    group: Any
    size: int
    grads_averaged: bool = False

    NUMBER_LEVEL = ("kind='number_level' cannot run under sequence parallelism: a number may "
                    "straddle two ranks' slices of the sequence; use was/mse/l1/huber")

    @classmethod
    def of(cls, group, grads_averaged: bool = False) -> Optional["SequenceParallel"]:
        """None without a group or with a group of one rank."""
        size = group_size(group)
        return cls(group, size, grads_averaged) if size > 1 else None

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def share(self, share: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``value`` (the micro-batch's, from all-reduced sums) with the gradient of this rank's
        ``share``, times the SP size when the framework averages over the group."""
        scaled = share * self.size if self.grads_averaged else share
        return value.detach() + (scaled - scaled.detach())  # exactly ``value`` on every rank
