"""Single-device NTL, written for readability: the oracle for every parallel path.

Semantics are the reference package's (ntloss 0.3.2) exactly, with one difference of default:
``reweigh=False`` (the paper's setting; ntloss defaults to True). Computed in float32 whatever the
logits dtype; the caller shifts labels. Unlike ntloss, out-of-range labels raise, padded logits
are fine (build the NumberVocab with the padded ``vocab_size``), and a batch without number labels
returns a zero that still back-propagates.
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import NTLConfig
from .checks import check_labels, check_logits, check_loss_weights, check_reduction
from .number_level import assemble_numbers, symmetric_ape
from .numbers import NumberVocab, label_targets
from .ops.math import dot_product_loss, number_distance, reweigh as reweigh_loss


def _check(logits, labels, vocab, loss_weights, reduction, ignore_index):
    check_logits(logits, labels)
    check_loss_weights(loss_weights, labels)
    check_reduction(reduction)
    if logits.shape[-1] != vocab.vocab_size:
        raise ValueError(f"logits have {logits.shape[-1]} vocab entries but the NumberVocab has "
                         f"{vocab.vocab_size}; build it with vocab_size={logits.shape[-1]}")
    check_labels(labels, vocab.vocab_size, ignore_index)


def _prepare(logits, labels, vocab, loss_weights, reduction, ignore_index):
    """Checked inputs as (fp32 logits, number ids, their values, label values, is_number)."""
    _check(logits, labels, vocab, loss_weights, reduction, ignore_index)
    z = logits.float()
    _, is_number, y = label_targets(labels, vocab.values.to(z.device), ignore_index)
    return z, vocab.number_ids.to(z.device), vocab.number_values.to(z.device), y, is_number


def _reduce(per_token, mask, loss_weights, reduction):
    w = mask.to(per_token.dtype)
    if loss_weights is not None:
        w = w * loss_weights.to(per_token.dtype)
    weighted = per_token * w
    if reduction == "none":
        return weighted
    total = weighted.sum()
    if reduction == "sum":
        return total
    return total / w.sum().clamp_min(torch.finfo(per_token.dtype).eps)


def ntl_loss(logits: torch.Tensor, labels: torch.Tensor, number_vocab: NumberVocab,
             kind: str = "was", reweigh: bool = False, squash_factor: Optional[float] = None,
             loss_weights: Optional[torch.Tensor] = None, reduction: str = "mean",
             ignore_index: int = -100, float_level: bool = False) -> torch.Tensor:
    """Token-level NTL. ``kind``: ``was`` (ntloss ``NTLoss``) or ``mse``/``l1``/``huber``
    (``NTLossDotProduct`` with that loss function); ``number_level`` delegates to
    :func:`number_level_loss` (``float_level`` applies there only)."""
    if kind == "number_level":
        return number_level_loss(logits, labels, number_vocab, float_level=float_level,
                                 reweigh=reweigh,
                                 loss_weights=loss_weights, reduction=reduction,
                                 ignore_index=ignore_index)
    NTLConfig(kind=kind, squash_factor=squash_factor, ignore_index=ignore_index)  # validates
    z, ids, v, y, is_number = _prepare(logits, labels, number_vocab, loss_weights, reduction,
                                       ignore_index)

    p = torch.softmax(z[..., ids], dim=-1)
    if kind == "was":
        squash = (squash_factor, *number_vocab.distance_span()) if squash_factor else None
        per_token = (p * number_distance(v, y.unsqueeze(-1), squash)).sum(-1)
    else:
        per_token = dot_product_loss(kind, (p * v).sum(-1), y)
    if reweigh:
        mass = torch.softmax(z, dim=-1)[..., ids].sum(-1)
        per_token = reweigh_loss(per_token, mass, number_vocab.max_distance(kind, squash_factor))
    per_token = torch.where(is_number, per_token, torch.zeros_like(per_token))
    return _reduce(per_token, is_number, loss_weights, reduction)


def number_level_loss(logits: torch.Tensor, labels: torch.Tensor, number_vocab: NumberVocab,
                      float_level: bool = False, reweigh: bool = False,
                      loss_weights: Optional[torch.Tensor] = None, reduction: str = "mean",
                      ignore_index: int = -100, max_number_length: int = 20) -> torch.Tensor:
    """ntloss ``NumberLevelLoss``: symmetric MAPE between whole numbers assembled from the digit
    labels and from the per-digit expected values. Needs a ``digits``-mode vocab, [B, T] labels."""
    if number_vocab.mode != "digits":
        raise ValueError("number-level NTL needs a NumberVocab in mode 'digits'")
    z, ids, v, y, is_digit = _prepare(logits, labels, number_vocab, loss_weights, reduction,
                                      ignore_index)
    yhat = (torch.softmax(z[..., ids], dim=-1) * v).sum(-1)
    is_dot = None
    if float_level:
        if number_vocab.decimal_point_id is None:
            raise ValueError("float_level=True needs a '.' token in the vocabulary")
        is_dot = labels == number_vocab.decimal_point_id
    y_num, yhat_num, start = assemble_numbers(y, yhat, is_digit, is_dot, max_number_length)
    per_token = symmetric_ape(yhat_num, y_num)
    if reweigh:
        mass = torch.softmax(z, dim=-1)[..., ids].sum(-1)
        per_token = reweigh_loss(per_token, mass, number_vocab.max_distance("number_level"))
    per_token = torch.where(start, per_token, torch.zeros_like(per_token))
    return _reduce(per_token, start, loss_weights, reduction)

