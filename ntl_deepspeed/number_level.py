"""Number-level NTL: assemble whole numbers from per-digit values (the reference's NumberLevelLoss).

Each maximal run of digit labels is one number, valued ``sum_i d_i * 10**(digits after i)``; the
same weights applied to the per-digit expected values give the predicted number. With
``float_level`` a single ``.`` between two digits joins them (``12.34`` -> ``1234``, as the
reference does). The number's value is written at its first digit; the other positions drop out.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def _shift_right(x: torch.Tensor, k: int = 1) -> torch.Tensor:
    out = torch.zeros_like(x)
    out[:, k:] = x[:, :-k]
    return out


def assemble_numbers(digit_label: torch.Tensor, digit_pred: torch.Tensor, is_digit: torch.Tensor,
                     is_dot: Optional[torch.Tensor] = None, max_number_length: int = 20
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """digit_label/digit_pred/is_digit/is_dot: [B, T]. Returns (label_number, predicted_number,
    number_start): the numbers at the first digit of each run (0 elsewhere) and that mask."""
    if is_digit.dim() != 2:
        raise ValueError(f"number-level NTL needs [batch, seq] labels, got {tuple(is_digit.shape)}")
    if is_digit.size(1) == 0:
        return torch.zeros_like(digit_label), torch.zeros_like(digit_pred), is_digit
    in_number = is_digit
    if is_dot is not None:
        dot_joins = is_dot & _shift_right(is_digit)
        dot_joins[:, :-1] &= is_digit[:, 1:]
        dot_joins[:, -1] = False
        in_number = is_digit | dot_joins
    start = in_number & ~_shift_right(in_number)

    flat_in, flat_digit = in_number.reshape(-1), is_digit.reshape(-1)
    flat_start = start.reshape(-1)
    span = torch.cumsum(flat_start.long(), 0) * flat_in  # 0 = outside every number
    n_spans = span.numel() + 1  # an upper bound: sizes never depend on the data (no host sync)
    digit_count = torch.zeros(n_spans, dtype=torch.long, device=span.device)
    digit_count.scatter_add_(0, span, flat_digit.long())
    digits_so_far = torch.cumsum(flat_digit.long(), 0)
    # digits before each span, written at its start; other positions write into a spare slot
    before_span = torch.zeros(n_spans + 1, dtype=torch.long, device=span.device)
    before_span.index_put_((torch.where(flat_start, span, n_spans),), digits_so_far - 1)
    digits_after = digit_count[span] - (digits_so_far - before_span[span])
    power = digits_after.clamp(0, max_number_length - 1)

    def place_values(per_digit: torch.Tensor) -> torch.Tensor:
        scale = torch.pow(10.0, power.to(per_digit.dtype))  # no host-to-device copy
        contrib = torch.where(flat_digit, per_digit.reshape(-1) * scale, torch.zeros_like(scale))
        sums = torch.zeros(n_spans, dtype=per_digit.dtype, device=per_digit.device)
        sums = sums.index_add(0, span, contrib)
        return torch.where(flat_start, sums[span], torch.zeros_like(contrib)).view_as(per_digit)

    return place_values(digit_label), place_values(digit_pred), start


def symmetric_ape(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``|pred - target| / (|pred| + |target| + eps)``, bounded in [0, 1]."""
    eps = torch.finfo(pred.dtype).eps
    return (pred - target).abs() / (pred.abs() + target.abs() + eps)
