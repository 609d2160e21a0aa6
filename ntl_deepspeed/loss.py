"""``vocab_parallel_ce_ntl``: CE + lambda * NTL from a vocab shard, with reductions."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .checks import check_shapes
from .config import NTLConfig
from .number_level import assemble_numbers, symmetric_ape
from .numbers import NumberVocab
from .ops.ntl_math import reweigh as reweigh_loss
from .ops.vocab_parallel import vocab_parallel_statistics


@dataclass
class CENTLOutput:
    """Reduced losses and per-token tensors (shaped like the labels)."""

    loss: torch.Tensor               # ce + weight * ntl (per token if reduction == "none")
    ce: torch.Tensor
    ntl: torch.Tensor
    ce_per_token: torch.Tensor       # 0 at ignored positions
    ntl_per_token: torch.Tensor      # 0 where no NTL applies
    predicted_value: torch.Tensor    # y-hat: expected value under the number-token softmax
    number_mass: torch.Tensor        # full-vocab probability on number tokens
    number_label_mask: torch.Tensor  # where the NTL applies
    valid_mask: torch.Tensor         # labels != ignore_index
    number_correct: torch.Tensor     # at number labels: the label is the most likely number token
    label_value: torch.Tensor        # value of the label token (0 where it is not a number)
    number_token_label: torch.Tensor # the label is a number token (whatever the NTL kind)
    ntl_count: torch.Tensor          # summed weights under the NTL (this call, not all-reduced)
    ce_count: torch.Tensor           # summed weights of valid tokens


def _number_level(labels, vocab, config, yhat, mass, is_digit):
    if vocab.mode != "digits":
        raise ValueError("NTL kind 'number_level' needs a NumberVocab in mode 'digits'")
    rows = labels if labels.dim() == 2 else labels.reshape(1, -1)
    y = vocab.values.to(labels.device)[torch.where(is_digit, labels, 0).long()]
    y = torch.where(is_digit, y, torch.zeros_like(y)).reshape(rows.shape)
    is_dot = None
    if config.float_level:
        if vocab.decimal_point_id is None:
            raise ValueError("float_level=True needs a '.' token in the vocabulary")
        is_dot = rows == vocab.decimal_point_id
    y_num, yhat_num, start = assemble_numbers(y, yhat.reshape(rows.shape),
                                              is_digit.reshape(rows.shape), is_dot)
    per_token = symmetric_ape(yhat_num, y_num)
    if config.reweigh:
        per_token = reweigh_loss(per_token, mass.reshape(rows.shape),
                                 vocab.max_distance("number_level"))
    start = start.reshape(labels.shape)
    return torch.where(start, per_token.reshape(labels.shape), torch.zeros_like(yhat)), start


def _global_count(count: torch.Tensor, dp_group) -> tuple:
    if dp_group is None or not dist.is_initialized() or dist.get_world_size(dp_group) == 1:
        return count, 1
    total = count.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=dp_group)
    return total, dist.get_world_size(dp_group)


def vocab_parallel_ce_ntl(logits: torch.Tensor, labels: torch.Tensor, number_vocab: NumberVocab,
                          tp_group=None, config: Optional[NTLConfig] = None, *,
                          vocab_start_index: Optional[int] = None,
                          loss_weights: Optional[torch.Tensor] = None, reduction: str = "mean",
                          dp_group=None, check_finite: bool = False, **overrides) -> CENTLOutput:
    """CE + ``config.weight`` * NTL for this rank's logits shard ``[..., V_local]``.

    ``labels`` are global ids (already shifted), identical on every rank of ``tp_group``.
    ``tp_group=None`` means the logits hold the whole vocabulary. Keyword ``overrides`` replace
    fields of ``config`` (e.g. ``kind="mse"``). ``loss_weights`` multiply both losses per token.
    Reduction ``mean``: CE over valid tokens (``F.cross_entropy``'s mean), NTL per
    ``config.normalization``. Collectives: 2 on ``tp_group`` in forward (see
    :class:`~ntl_deepspeed.ops.vocab_parallel.VocabParallelCENTL`), plus one on ``dp_group`` for
    ``normalization='global'``; none in backward.
    """
    config = dataclasses.replace(config or NTLConfig(), **overrides)
    check_shapes(logits, labels, loss_weights, reduction)
    per_token = vocab_parallel_statistics(
        logits, labels, number_vocab, token_kind(config), tp_group=tp_group,
        reweigh=config.reweigh, squash_factor=config.squash_factor,
        vocab_start_index=vocab_start_index, ignore_index=config.ignore_index,
        check_finite=check_finite)
    return finish(per_token, labels, number_vocab, config, loss_weights, reduction, dp_group)


def token_kind(config: NTLConfig) -> str:
    """The per-token kind the op computes (number-level NTL is assembled afterwards)."""
    return "none" if not config.enabled or config.kind == "number_level" else config.kind


def finish(per_token, labels, number_vocab: NumberVocab, config: NTLConfig, loss_weights,
           reduction: str, dp_group) -> CENTLOutput:
    """Number-level assembly, weights and reductions on the op's per-token outputs."""
    ce, ntl, yhat, mass, correct = per_token

    valid = labels != config.ignore_index
    label_value = number_vocab.values.to(labels.device)[torch.where(valid, labels, 0).long()]
    is_number = valid & ~torch.isnan(label_value)
    label_value = torch.where(is_number, label_value, torch.zeros_like(label_value))
    ntl_mask = is_number
    if config.enabled and config.kind == "number_level":
        ntl, ntl_mask = _number_level(labels, number_vocab, config, yhat, mass, is_number)

    w = torch.ones_like(ce) if loss_weights is None else loss_weights.to(ce.dtype)
    ce_w = torch.where(valid, w, torch.zeros_like(w))
    ntl_w = torch.where(ntl_mask, w, torch.zeros_like(w))
    ce_count, ntl_count = ce_w.sum(), ntl_w.sum()
    weight = config.weight if config.enabled else 0.0
    if reduction == "none":
        ce_r, ntl_r = ce * ce_w, ntl * ntl_w
    elif reduction == "sum":
        ce_r, ntl_r = (ce * ce_w).sum(), (ntl * ntl_w).sum()
    else:
        eps = torch.finfo(ce.dtype).eps
        ce_r = (ce * ce_w).sum() / ce_count.clamp_min(eps)
        ntl_sum = (ntl * ntl_w).sum()
        if config.normalization == "micro_batch":
            ntl_r = ntl_sum / ntl_count.clamp_min(eps)
        elif config.normalization == "token":
            ntl_r = ntl_sum / ce_count.clamp_min(eps)
        else:  # global: sum over DP / count over DP; x dp_size undoes DP gradient averaging
            total, dp_size = _global_count(ntl_count, dp_group)
            ntl_r = ntl_sum * dp_size / total.clamp_min(eps)
    return CENTLOutput(ce_r + weight * ntl_r, ce_r, ntl_r, ce, ntl, yhat, mass, ntl_mask, valid,
                       correct, label_value, is_number, ntl_count, ce_count)
