"""Process-group facts every path needs, in one place (no group = one rank)."""
from __future__ import annotations

from typing import Tuple

import torch.distributed as dist


def group_size_rank(group) -> Tuple[int, int]:
    """(size, rank) of ``group``; (1, 0) without a group or without torch.distributed."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def group_size(group) -> int:
    return group_size_rank(group)[0]
