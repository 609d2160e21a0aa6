"""CE + lambda*NTL for a Hugging Face causal LM: what both HF paths (materialised logits, fused
head) run once they have logits or hidden states."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ntl_deepspeed.checks import check_config_fits_vocab, check_vocab_argument
from ntl_deepspeed.config import NTLConfig
from ntl_deepspeed.flops import record_ce_ntl_flops
from ntl_deepspeed.loss import CENTLOutput, ce_ntl
from ntl_deepspeed.numbers import NumberVocab


def shift_left(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Position t is trained to predict token t + 1, as transformers shifts; the last position
    gets ``ignore_index``."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


@dataclass
class HFLoss:
    """The NTL settings of one HF model and the loss computation both HF paths share.

    ``tp_group`` / ``vocab_start_index``: a vocab-parallel head (DeepSpeed AutoTP's ``mp_group``
    and ``vocab_start_index``); ``dp_group`` for ``normalization="global"``; ``on_output``
    receives every :class:`CENTLOutput` (metrics). ``sp_group`` / ``sp_grads_averaged``:
    sequence parallelism (DeepSpeed Ulysses; ``dp_group`` then spans the data x sequence
    parallel ranks), see :func:`ntl_deepspeed.loss.token_weights`.

    One ``"ntl"`` section means the same NTL strength everywhere. Without
    ``num_items_in_batch`` the loss is this micro-batch's ``CE + lambda * NTL`` (CE per valid
    token, NTL per ``config.normalization``) -- what our trainer and a plain loop use. With it
    (HF ``Trainer``: the valid tokens of the whole accumulated batch, after which Trainer does not
    divide by the accumulation steps) that same loss is weighted by this micro-batch's share of
    the valid tokens, ``loss * n_valid / num_items_in_batch``: the CE part is then exactly
    transformers' ``sum CE / num_items_in_batch``, and NTL keeps its normalisation instead of being
    diluted over every valid token. One micro-batch per step on one device: identical losses.
    """

    vocab: NumberVocab
    config: NTLConfig
    tp_group: object = None
    vocab_start_index: Optional[int] = None
    dp_group: object = None
    on_output: Optional[Callable[[CENTLOutput], None]] = None
    sp_group: object = None
    sp_grads_averaged: bool = False

    def __post_init__(self):  # at apply/install time, not at the first forward
        check_vocab_argument(self.vocab, "vocab", shard_ok=False)
        if not isinstance(self.config, NTLConfig):
            raise TypeError(f"config must be an NTLConfig, got {type(self.config).__name__}")
        check_config_fits_vocab(self.config, self.vocab)

    def check_ignore_index(self, ignore_index: int) -> None:
        if ignore_index != self.config.ignore_index:
            raise ValueError(f"the model asks for ignore_index={ignore_index}, the NTL config "
                             f"has {self.config.ignore_index}")

    def __call__(self, labels: Optional[torch.Tensor], shift_labels: Optional[torch.Tensor],
                 num_items_in_batch, *, width: int, device: torch.device,
                 **inputs) -> torch.Tensor:
        """The loss from ``logits=...`` or ``hidden=..., head_weight=..., head_bias=...``."""
        if shift_labels is None:
            shift_labels = shift_left(labels, self.config.ignore_index)
        shift_labels = shift_labels.to(device)
        shard = self.vocab.shard_for(width, self.tp_group, self.vocab_start_index, device)
        out = ce_ntl(shift_labels, shard, self.config, dp_group=self.dp_group,
                     sp_group=self.sp_group, sp_grads_averaged=self.sp_grads_averaged, **inputs)
        record_ce_ntl_flops(shift_labels.numel(), width, shard.number_ids.numel())
        if self.on_output is not None:
            self.on_output(out)
        if num_items_in_batch is None:
            return out.loss
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(out.loss.device)
        return out.loss * (out.ce_count / num_items_in_batch)

    def loss_function(self):
        """A drop-in for ``model.loss_function`` (transformers' ``ForCausalLMLoss`` signature)."""

        def loss_function(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int = None,
                          num_items_in_batch=None, ignore_index: int = -100,
                          shift_labels: Optional[torch.Tensor] = None, **_):
            self.check_ignore_index(ignore_index)
            return self(labels, shift_labels, num_items_in_batch, width=logits.shape[-1],
                        device=logits.device, logits=logits)

        loss_function.ntl = self
        return loss_function
