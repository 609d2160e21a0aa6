"""Make a Hugging Face causal LM compute CE + lambda*NTL with the fused op.

Works for full-vocab logits (``tp_group=None``) and for DeepSpeed AutoTP's vocab-parallel head
(per-rank ``[B, S, V/tp]`` logits; pass the TP group and the head's ``vocab_start_index``).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..config import NTLConfig
from ..loss import CENTLOutput, vocab_parallel_ce_ntl
from ..numbers import NumberVocab
from .flops import record_ce_ntl_flops


def shift_left(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Position t is trained to predict token t + 1, as transformers shifts; the last position
    gets ``ignore_index``."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def check_ignore_index(ignore_index: int, config: NTLConfig) -> None:
    if ignore_index != config.ignore_index:
        raise ValueError(f"the model asks for ignore_index={ignore_index}, the NTL config "
                         f"has {config.ignore_index}")


@functools.lru_cache(maxsize=64)
def local_number_count(vocab: NumberVocab, vocab_start_index: Optional[int], width: int) -> int:
    """Number tokens among this rank's ``width`` head rows (for the flops profiler); cached, as
    it is asked every step."""
    start = vocab_start_index or 0
    return vocab.shard(start=start, end=min(start + width, vocab.vocab_size)).number_ids.numel()


def reduction_for(num_items_in_batch) -> str:
    """transformers' gradient-accumulation convention: given ``num_items_in_batch`` (the valid
    tokens of the whole accumulated batch), the loss is the *sum* over this micro-batch divided
    by it, and HF ``Trainer`` then does not divide by the accumulation steps."""
    return "mean" if num_items_in_batch is None else "sum"


def scaled_loss(out: CENTLOutput, num_items_in_batch) -> torch.Tensor:
    if num_items_in_batch is None:
        return out.loss
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(out.loss.device)
    return out.loss / num_items_in_batch


def make_causal_lm_loss(vocab: NumberVocab, config: NTLConfig, tp_group=None,
                        vocab_start_index: Optional[int] = None, dp_group=None,
                        on_output: Optional[Callable[[CENTLOutput], None]] = None,
                        check_finite: bool = False):
    """A drop-in for ``model.loss_function`` (transformers' ``ForCausalLMLoss`` signature).

    Labels are shifted here as HF does (unless ``shift_labels`` is given). The loss is the mean
    over this micro-batch's valid tokens (NTL normalised per ``config.normalization``); with
    ``num_items_in_batch`` (HF ``Trainer`` gradient accumulation) it is
    ``(sum CE + weight * sum NTL) / num_items_in_batch``, as transformers does for CE, so NTL is
    then normalised per valid token. ``on_output`` receives the full :class:`CENTLOutput`.
    """

    def loss_function(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int = None,
                      num_items_in_batch=None, ignore_index: int = -100,
                      shift_labels: Optional[torch.Tensor] = None, **_):
        check_ignore_index(ignore_index, config)
        if shift_labels is None:
            shift_labels = shift_left(labels, ignore_index)
        out = vocab_parallel_ce_ntl(logits, shift_labels.to(logits.device), vocab, tp_group,
                                    config, vocab_start_index=vocab_start_index,
                                    dp_group=dp_group, check_finite=check_finite,
                                    reduction=reduction_for(num_items_in_batch))
        record_ce_ntl_flops(shift_labels.numel(), logits.shape[-1],
                            local_number_count(vocab, vocab_start_index,
                                               logits.shape[-1]))
        if on_output is not None:
            on_output(out)
        return scaled_loss(out, num_items_in_batch)

    loss_function.ntl_config = config
    return loss_function
