"""One tensor-parallel rank's slice of the vocabulary and its number tokens (``VocabShard``),
built once per layout and handed to every loss path (logits, hidden states, DeepSpeed AutoTP,
Megatron, no TP)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

import torch

from ..parallel import group_size_rank

if TYPE_CHECKING:
    from .vocab import NumberVocab


def partition_bounds(vocab_size: int, world_size: int) -> List[Tuple[int, int]]:
    """[start, end) of each rank's vocab shard; uneven sizes give the first ranks one more id."""
    if world_size < 1 or vocab_size < world_size:
        raise ValueError(f"cannot split a vocab of {vocab_size} over {world_size} ranks")
    base, extra = divmod(vocab_size, world_size)
    bounds, start = [], 0
    for r in range(world_size):
        end = start + base + (1 if r < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


@dataclass(frozen=True, eq=False)
class VocabShard:
    """One rank's slice ``[start, end)`` of the vocab, its number tokens, and its group.

    Built once by :meth:`NumberVocab.shard_for` (cached) and handed to every loss path. Tensors
    live on the logits' device. ``fits`` is False when the rank's logits width does not match its
    claimed slice: the op then reports it through its first collective, so that every rank of
    ``group`` raises the same error instead of some waiting forever.
    """

    vocab: "NumberVocab"
    start: int
    end: int
    width: int                   # columns of this rank's logits / head rows
    group: Any                   # tensor-parallel process group, None without TP
    group_size: int
    rank: int
    fits: bool
    number_ids: torch.Tensor     # int64, relative to ``start``, all < width
    number_values: torch.Tensor  # float32, same order
    values: torch.Tensor         # float32 [vocab_size]: every token's value (NaN: not a number)
    column_to_number: torch.Tensor  # int64 [width]: index into number_ids, -1 elsewhere

    @property
    def vocab_size(self) -> int:
        return self.vocab.vocab_size

    @property
    def parallel(self) -> bool:
        return self.group_size > 1


def label_targets(labels: torch.Tensor, values: torch.Tensor, ignore_index: int):
    """``(valid, is_number, y)`` per label: not ignored; a number token; its value (0 elsewhere).
    Ids outside the vocab are clamped here (they are reported by the input checks)."""
    valid = labels != ignore_index
    ids = torch.where(valid, labels, 0).clamp(0, values.numel() - 1)
    value = values[ids]
    is_number = valid & ~torch.isnan(value)
    return valid, is_number, torch.where(is_number, value, torch.zeros_like(value))


def build_shard(vocab: "NumberVocab", width: int, group, start: Optional[int],
                device) -> VocabShard:
    """The :class:`VocabShard` of this rank of ``group`` for logits ``width`` wide: the whole
    vocab without TP, ``[start, start + width)`` when ``start`` is given, else the even
    partition by rank (:func:`partition_bounds`)."""
    size, rank = group_size_rank(group)
    if size == 1:
        if start not in (None, 0):
            raise ValueError(f"vocab_start_index={start} was given without a tensor-parallel "
                             "group (tp_group=None or of size 1): the logits must then hold "
                             "the whole vocab; pass the TP group too")
        if width != vocab.vocab_size:
            raise ValueError(f"logits have {width} vocab entries but the NumberVocab has "
                             f"{vocab.vocab_size}; build it with vocab_size={width}, or pass "
                             "the tensor-parallel group and this shard's vocab_start_index")
        start, end = 0, width
    elif start is None:
        start, end = partition_bounds(vocab.vocab_size, size)[rank]
    else:
        start, end = int(start), int(start) + width
    fits = end - start == width and 0 <= start < end <= vocab.vocab_size
    lo = min(max(start, 0), vocab.vocab_size - 1)  # in bounds even when it does not fit
    ids, vals = vocab.slice_numbers(lo, min(max(end, lo + 1), vocab.vocab_size))
    keep = ids < width
    ids, vals = ids[keep], vals[keep]
    column_to_number = torch.full((width,), -1, dtype=torch.long)
    column_to_number[ids] = torch.arange(ids.numel())
    to = functools.partial(torch.Tensor.to, device=torch.device(device))
    return VocabShard(vocab, start, end, width, group, size, rank, fits, to(ids), to(vals),
                      to(vocab.values), to(column_to_number))
