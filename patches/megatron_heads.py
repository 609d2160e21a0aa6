"""The per-token CE + lambda*NTL of one Megatron LM head, from its logits or (fused) from its
hidden states; shared by the runtime patch (:mod:`.megatron_core`) and the ``output_processor``
hook (:mod:`.megatron_output_processor`).

Megatron's layout: logits ``[s, b, V/tp]``, labels ``[b, s]``, rank r of the TP group holding
vocab columns ``[r * V/tp, (r + 1) * V/tp)`` (what its ``vocab_parallel_cross_entropy`` assumes).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ntl_deepspeed import NTLConfig, NumberVocab, ce_ntl

_PROBE = (1.0, -2.5)


def shard(vocab: NumberVocab, width: int, group, device):
    """This rank's VocabShard in Megatron's vocab-parallel layout (``group`` None: one rank)."""
    start = None if group is None else torch.distributed.get_rank(group) * width
    return vocab.shard_for(width, group, start=start, device=device)


def logits_loss(vocab: NumberVocab, config: NTLConfig, labels: torch.Tensor,
                logits: torch.Tensor, group):
    """``ce_ntl`` on ``[s, b, V/tp]`` logits (never modified: Megatron's own CE overwrites fp32
    logits in place, ours does not). Collectives: the op's two forward all-reduces on ``group``."""
    return ce_ntl(labels.transpose(0, 1).contiguous(),
                  shard(vocab, logits.shape[-1], group, logits.device), config, logits=logits,
                  reduction="none")


def constant_scale(scale_logits: Optional[Callable], what: str) -> float:
    """The factor by which Megatron's logit scaling (``LanguageModule._scale_logits``: MuP's
    ``mup_output_mult``) multiplies the output layer's result. Probed on a small CPU tensor
    (no device sync); anything but a constant factor is refused, since the fused head folds the
    factor into the hidden states."""
    if scale_logits is None:
        return 1.0
    probe = torch.tensor(_PROBE, dtype=torch.float64)
    out = scale_logits(probe.clone())
    factor = float(out[0])
    if out.shape != probe.shape or not torch.allclose(out, probe * factor, rtol=1e-12, atol=0):
        raise ValueError(f"ntl fused_head: {what} is not a constant factor on the logits (maps "
                         f"{list(_PROBE)} to {out.tolist()}); the fused head cannot compute it "
                         "from the hidden states -- run without fused_head")
    return factor


def fused_loss(vocab: NumberVocab, config: NTLConfig, labels: torch.Tensor,
               hidden: torch.Tensor, layer, weight: Optional[torch.Tensor], scale: float = 1.0):
    """``ce_ntl`` from the output layer's (``ColumnParallelLinear``) input ``[s(/tp), b, h]``
    and its weight shard -- the logits ``scale * (hidden @ W.T + b)`` are never materialised.

    The hidden states go through Megatron's own TP region op, so their gradient is reduced as
    the layer's own would be: ``copy_to_tensor_model_parallel_region`` (forward identity,
    backward all-reduce), or under sequence parallelism ``gather_from_sequence_parallel_region``
    (forward all-gather, backward reduce-scatter); plus the op's two forward all-reduces. A
    logit scale is folded into the hidden states (and bias), which is exact for a constant."""
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region)

    if getattr(layer.config, "defer_embedding_wgrad_compute", False):
        raise ValueError("ntl fused_head does not support defer_embedding_wgrad_compute")
    group = layer.tp_group
    tp = torch.distributed.get_world_size(group) if group is not None else 1
    if layer.sequence_parallel and tp > 1:
        hidden = gather_from_sequence_parallel_region(hidden, True, group=group)
    elif tp > 1:
        hidden = copy_to_tensor_model_parallel_region(hidden, group=group)
    weight = layer.weight if weight is None else weight
    bias = None if layer.skip_bias_add else layer.bias
    if scale != 1.0:
        hidden = hidden * scale
        bias = None if bias is None else bias * scale
    return ce_ntl(labels.transpose(0, 1).contiguous(),
                  shard(vocab, weight.shape[0], group if tp > 1 else None, hidden.device),
                  config, hidden=hidden, head_weight=weight, head_bias=bias, reduction="none")


def per_token(out) -> torch.Tensor:
    """Megatron's per-token loss layout ``[b, s]`` from a ``[s, b]`` op output."""
    return out.loss.transpose(0, 1).contiguous()


def ntl_record(out):
    """What :func:`report_entry` needs of one main-head output: (NTL, number-label mask) [b, s]."""
    return out.ntl.detach().transpose(0, 1), out.number_label_mask.transpose(0, 1)


def report_entry(record, loss_mask: torch.Tensor) -> Optional[torch.Tensor]:
    """``[masked NTL sum, masked number-label count]``: the form Megatron-LM's training loop sums
    over microbatches and DP ranks and then divides."""
    if record is None:
        return None
    ntl, number_mask = record
    mask = loss_mask.reshape(ntl.shape).to(ntl.dtype) * number_mask.to(ntl.dtype)
    return torch.stack([(ntl * mask).sum(), mask.sum()])
