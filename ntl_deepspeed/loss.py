"""``ce_ntl``: the one front door. Validate once -> op (logits or hidden states) -> reductions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist

from .checks import (check_head, check_labels, check_logits, check_loss_weights,
                     check_reduction)
from .config import NTLConfig
from .number_level import assemble_numbers, symmetric_ape
from .numbers import NumberVocab, VocabShard, label_targets
from .ops.hidden import Blocking, hidden_statistics
from .ops.hidden_reduced import budget_token_chunk, reduced_hidden_statistics
from .ops.logits import logits_statistics
from .ops.math import reweigh
from .ops.statistics import OpSpec, PerToken
from .parallel import group_size


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
    number_correct: torch.Tensor     # at number labels: the label alone is the most likely number
    label_value: torch.Tensor        # value of the label token (0 where it is not a number)
    number_token_label: torch.Tensor # the label is a number token (whatever the NTL kind)
    ntl_count: torch.Tensor          # summed weights under the NTL (this call, not all-reduced)
    ce_count: torch.Tensor           # summed weights of valid tokens


def ce_ntl(labels: torch.Tensor, shard: Union[VocabShard, NumberVocab],
           config: Optional[NTLConfig] = None, *, logits: Optional[torch.Tensor] = None,
           hidden: Optional[torch.Tensor] = None, head_weight: Optional[torch.Tensor] = None,
           head_bias: Optional[torch.Tensor] = None,
           loss_weights: Optional[torch.Tensor] = None, reduction: str = "mean",
           dp_group=None, gemm_dtype: Optional[torch.dtype] = None) -> CENTLOutput:
    """CE + ``config.weight`` * NTL, from this rank's ``logits`` ``[..., V_local]``, or from
    ``hidden`` ``[..., H]`` and this rank's rows of the LM head ``head_weight`` ``[V_local, H]``
    (+ ``head_bias``) without materialising the logits (``config.fused_block_size`` /
    ``fused_token_chunk``; GEMM operands in ``gemm_dtype``: default fp32 on CPU, the input dtype
    on CUDA).

    ``labels`` are global ids (already shifted), identical on every rank of the shard's group.
    ``shard`` comes from :meth:`NumberVocab.shard_for` (a NumberVocab means the whole vocab on
    one rank). ``loss_weights`` multiply both losses per token. Reduction ``mean``: CE over valid
    tokens (``F.cross_entropy``'s mean), NTL per ``config.normalization``. Collectives: 2 on the
    shard's group in forward (see :mod:`ntl_deepspeed.ops.statistics`) -- per token chunk when
    the fused head computes the reduced loss's gradients in its forward (docs/fused_head.md,
    "Communication") -- plus one on ``dp_group`` for ``normalization='global'``; none in
    backward. No host synchronisation unless
    ``config.check_inputs`` / ``check_finite``.
    """
    config = config or NTLConfig()
    if (logits is None) == (hidden is None) or (hidden is None) != (head_weight is None):
        raise TypeError("ce_ntl takes logits=..., or hidden=... with head_weight=...")
    if logits is not None:
        check_logits(logits, labels)
        width, device = logits.shape[-1], logits.device
    else:
        check_head(hidden, head_weight, head_bias, labels)
        width, device = head_weight.shape[0], hidden.device
    if isinstance(shard, NumberVocab):
        shard = shard.shard_for(width, device=device)
    if shard.width != width:
        raise ValueError(f"the shard is {shard.width} columns wide but the "
                         f"{'logits have' if logits is not None else 'head has'} {width}")
    check_reduction(reduction)
    check_loss_weights(loss_weights, labels, host=config.check_inputs)
    check_labels(labels, shard.vocab_size, config.ignore_index, host=config.check_inputs)

    spec = OpSpec.build(config, shard)
    if logits is not None:
        per_token = logits_statistics(logits, labels, shard, spec, config.backend)
    elif _reduced_loss_gradients(config, reduction, loss_weights, hidden, head_weight,
                                 head_bias):
        return _fused_reduced(labels, shard, config, spec, hidden, head_weight, head_bias,
                              loss_weights, reduction, dp_group, gemm_dtype)
    else:
        blocking = Blocking.build(hidden, config.fused_block_size, config.fused_token_chunk,
                                  gemm_dtype)
        per_token = hidden_statistics(hidden, head_weight, head_bias, labels, shard, spec,
                                      blocking)
    return reduce_per_token(PerToken(*per_token), labels, shard, config, loss_weights,
                            reduction, dp_group)


def _reduced_loss_gradients(config: NTLConfig, reduction: str, loss_weights, *head) -> bool:
    """The fused head computes the reduced loss's gradients in its forward when a backward can
    follow and the reduced loss is linear in the per-token CE / NTL (not number-level NTL, not
    differentiable loss weights). See docs/fused_head.md."""
    return (reduction != "none" and torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in head)
            and not (config.enabled and config.kind == "number_level")
            and not (loss_weights is not None and loss_weights.requires_grad))


def _fused_reduced(labels, shard, config, spec, hidden, head_weight, head_bias, loss_weights,
                   reduction, dp_group, gemm_dtype) -> CENTLOutput:
    valid, is_number, _ = label_targets(labels, shard.values, config.ignore_index)
    weights = token_weights(valid, is_number, loss_weights, config, reduction, dp_group)
    coef_ce, coef_ntl = weights.loss_coefficients(config.active_weight)
    chunk = config.fused_token_chunk or budget_token_chunk(
        labels.numel(), head_weight.shape[0], hidden.shape[-1])
    blocking = Blocking.build(hidden, config.fused_block_size, chunk, gemm_dtype)
    per_token, anchor = reduced_hidden_statistics(hidden, head_weight, head_bias, labels,
                                                  coef_ce, coef_ntl, shard, spec, blocking)
    out = reduce_per_token(PerToken(*per_token), labels, shard, config, loss_weights, reduction,
                           dp_group, weights)
    # the loss's gradient flows through the anchor only (per-token outputs keep theirs)
    out.loss = out.loss.detach() + anchor
    return out


def _number_level(labels, shard: VocabShard, config: NTLConfig, per_token: PerToken,
                  is_digit, y):
    """Per-number symmetric APE at each number's first digit (ntloss' NumberLevelLoss)."""
    rows = labels.shape if labels.dim() == 2 else (1, labels.numel())  # numbers run along rows
    is_dot = None
    if config.float_level:
        if shard.vocab.decimal_point_id is None:
            raise ValueError("float_level=True needs a '.' token in the vocabulary")
        is_dot = (labels == shard.vocab.decimal_point_id).reshape(rows)
    y_num, yhat_num, start = assemble_numbers(y.reshape(rows), per_token.yhat.reshape(rows),
                                              is_digit.reshape(rows), is_dot)
    loss = symmetric_ape(yhat_num, y_num)
    if config.reweigh:
        loss = reweigh(loss, per_token.mass.reshape(rows),
                       shard.vocab.max_distance("number_level"))
    start = start.reshape(labels.shape)
    return torch.where(start, loss.reshape(labels.shape), torch.zeros_like(per_token.yhat)), start


def _global_count(count: torch.Tensor, dp_group):
    """(count summed over ``dp_group``, its size)."""
    size = group_size(dp_group)
    if size == 1:
        return count, 1
    total = count.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=dp_group)
    return total, size


@dataclass
class TokenWeights:
    """Each token's weight in the reduced CE and NTL, and the divisors of their sums: all known
    from the labels (and ``loss_weights``) before the op runs."""

    ce_w: torch.Tensor
    ntl_w: torch.Tensor
    ce_count: torch.Tensor
    ntl_count: torch.Tensor
    ce_div: torch.Tensor
    ntl_div: torch.Tensor

    def loss_coefficients(self, ntl_weight: float):
        """d loss / d ce_t and d loss / d ntl_t of the reduced ``loss = ce + ntl_weight * ntl``."""
        return self.ce_w / self.ce_div, self.ntl_w * (ntl_weight / self.ntl_div)


def token_weights(valid, ntl_mask, loss_weights, config: NTLConfig, reduction: str,
                  dp_group) -> TokenWeights:
    w = torch.ones(valid.shape, device=valid.device) if loss_weights is None \
        else loss_weights.float()
    ce_w = torch.where(valid, w, torch.zeros_like(w))
    ntl_w = torch.where(ntl_mask, w, torch.zeros_like(w))
    ce_count, ntl_count = ce_w.sum(), ntl_w.sum()
    one = torch.ones_like(ce_count)
    ce_div = ntl_div = one
    if reduction == "mean":
        eps = torch.finfo(ce_count.dtype).eps
        ce_div = ce_count.clamp_min(eps)
        if config.normalization == "micro_batch":
            ntl_div = ntl_count.clamp_min(eps)
        elif config.normalization == "token":
            ntl_div = ce_div
        else:  # global: sum over DP / count over DP; x dp_size undoes DP gradient averaging
            total, dp_size = _global_count(ntl_count, dp_group)
            ntl_div = total.clamp_min(eps) / dp_size
    return TokenWeights(ce_w, ntl_w, ce_count, ntl_count, ce_div, ntl_div)


def reduce_per_token(per_token: PerToken, labels: torch.Tensor, shard: VocabShard,
                     config: NTLConfig, loss_weights, reduction: str, dp_group,
                     weights: Optional[TokenWeights] = None) -> CENTLOutput:
    """Number-level assembly, weights and reductions on the op's per-token outputs
    (``weights``: already computed by :func:`token_weights`)."""
    ce, ntl = per_token.ce, per_token.ntl
    valid, is_number, label_value = label_targets(labels, shard.values, config.ignore_index)
    ntl_mask = is_number
    if config.enabled and config.kind == "number_level":
        ntl, ntl_mask = _number_level(labels, shard, config, per_token, is_number, label_value)
    if weights is None:
        weights = token_weights(valid, ntl_mask, loss_weights, config, reduction, dp_group)
    ce_w, ntl_w = weights.ce_w, weights.ntl_w
    if reduction == "none":
        ce_r, ntl_r = ce * ce_w, ntl * ntl_w
    else:
        ce_r = (ce * ce_w).sum() / weights.ce_div
        ntl_r = (ntl * ntl_w).sum() / weights.ntl_div
    return CENTLOutput(ce_r + config.active_weight * ntl_r, ce_r, ntl_r, ce, ntl,
                       per_token.yhat, per_token.mass, ntl_mask, valid, per_token.correct,
                       label_value, is_number, weights.ntl_count, weights.ce_count)
