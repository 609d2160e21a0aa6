"""How large NTL and its gradient can get on a number vocabulary: the worst per-token loss
(``reweigh``), a bound of the logit gradient (must fit the logits' dtype) and of the op's float32
intermediates; :func:`check_representable` refuses values that would overflow, naming the
largest token and a fix. Host arithmetic on the vocab's value table only.

Each kind's bounds are one entry of :data:`KIND_BOUNDS`, in terms of the value span ``s`` (largest
minus smallest value) and the WAS ``squash_factor``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

import torch

from ..config import REWEIGH_MARGIN
from .values import shown

if TYPE_CHECKING:
    from .vocab import NumberVocab


@dataclass(frozen=True)
class KindBounds:
    """``max_distance(s, squash)``: the largest per-token loss between two number tokens;
    ``gradient(s, squash)``: a bound of ``|d NTL / d logit|`` for one token (weight 1)."""

    max_distance: Callable[[float, Optional[float]], float]
    gradient: Callable[[float, Optional[float]], float]


def _was_distance(s: float, squash: Optional[float]) -> float:
    return float(squash) if squash is not None else s


KIND_BOUNDS: Dict[str, KindBounds] = {
    # |p_k (D_k - l)| <= max D; squashed distances are at most the factor
    "was": KindBounds(_was_distance, _was_distance),
    # |2 (yhat - y) p_k (v_k - yhat)| <= 2 s^2
    "mse": KindBounds(lambda s, _: s * s, lambda s, _: 2.0 * s * s),
    # |p_k (v_k - yhat)| <= s
    "l1": KindBounds(lambda s, _: s, lambda s, _: s),
    # Huber with delta 1 (torch's default)
    "huber": KindBounds(lambda s, _: 0.5 * s * s if s < 1 else s - 0.5, lambda s, _: s),
    # symmetric MAPE is bounded by 1; digits only: a small multiple of the digit span
    "number_level": KindBounds(lambda s, _: 1.0, lambda s, _: 2.0 * s),
}


def _kind(kind: str) -> KindBounds:
    try:
        return KIND_BOUNDS[kind]
    except KeyError:
        raise ValueError(f"unknown NTL kind {kind!r}") from None


def span(vocab: "NumberVocab") -> float:
    vmin, vmax = vocab.value_range
    return vmax - vmin


def max_distance(vocab: "NumberVocab", kind: str, squash_factor: Optional[float] = None) -> float:
    """The largest per-token loss of ``kind`` between two number tokens (for ``reweigh``)."""
    return _kind(kind).max_distance(span(vocab), squash_factor)


def gradient_bound(vocab: "NumberVocab", kind: str = "was", weight: float = 1.0,
                   reweigh: bool = False, squash_factor: Optional[float] = None) -> float:
    """An upper bound of ``|d (weight * NTL) / d logit|`` for one token (reduction ``sum``),
    plus ``REWEIGH_MARGIN * max_distance`` with ``reweigh``. The op computes in fp32 and rounds
    the gradient into the logits' dtype at the end, so this must fit that dtype."""
    bound = _kind(kind).gradient(span(vocab), squash_factor)
    if reweigh:
        bound += REWEIGH_MARGIN * max_distance(vocab, kind, squash_factor)
    return float(weight) * bound


def fp32_bound(vocab: "NumberVocab", kind: str = "was", reweigh: bool = False,
               squash_factor: Optional[float] = None) -> float:
    """An upper bound of the op's float32 intermediates (it always computes in fp32): the
    per-token sums taken before normalising, ``sum_k e_k v_k`` and ``sum_k e_k D(v_k, y)``
    with ``e_k <= 1`` (so at most ``sum_k |v_k|`` and ``sum_k max_y |v_k - y|``), the loss
    and its unweighted gradient."""
    v = vocab.number_values.double()
    vmin, vmax = vocab.value_range
    sums = float(v.abs().sum())
    if kind == "was":
        sums = max(sums, len(v) * float(squash_factor) if squash_factor is not None else
                   float(torch.maximum((v - vmin).abs(), (v - vmax).abs()).sum()))
    return max(sums, gradient_bound(vocab, kind, 1.0, reweigh, squash_factor))


def check_representable(vocab: "NumberVocab", dtype: torch.dtype, kind: str = "was",
                        weight: float = 1.0, reweigh: bool = False,
                        squash_factor: Optional[float] = None) -> None:
    """Raise a ValueError when the op's float32 arithmetic can overflow on these number
    values (e.g. MSE on a float token ``1e20``: squared distances ``1e40``), or when NTL's
    gradient on logits of ``dtype`` can overflow it (e.g. NTL-MSE on integer tokens up to
    999 in float16: ``2 * 999^2 * 0.3 = 6e5 > 65504``; even the loss scale 1 cannot help).
    Measured: ``ce_ntl`` with fp16 logits and number tokens up to 1e6 gives an inf gradient
    for MSE, and for WAS/L1/Huber as soon as a loss scale is applied. bf16 and fp32 have
    float32's range."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"check_representable: {dtype} is not a floating-point dtype")
    fp32_max = torch.finfo(torch.float32).max
    inner = fp32_bound(vocab, kind, reweigh, squash_factor)
    if not inner < fp32_max:
        raise ValueError(
            f"{_subject(vocab, kind, weight, reweigh)}: the loss's float32 arithmetic "
            f"reaches {inner:.3g}, beyond float32's largest value {fp32_max:.6g}: the loss "
            "would be inf or NaN in any dtype. Fix: " + ", or ".join(
                _fixes(vocab, kind, squash_factor)
                + ["leave such tokens out of the number vocabulary"]))
    limit = torch.finfo(dtype).max
    bound = gradient_bound(vocab, kind, weight, reweigh, squash_factor)
    if not bound < limit:
        raise ValueError(
            f"{_subject(vocab, kind, weight, reweigh)} can give logit gradients up to "
            f"{bound:.3g} per token, beyond {dtype}'s largest value {limit:.6g}: the "
            "gradients would overflow to inf. Fix: " + ", or ".join(
                ["train in bf16 or fp32"] + _fixes(vocab, kind, squash_factor)))


def _subject(vocab: "NumberVocab", kind: str, weight: float, reweigh: bool) -> str:
    vmin, vmax = vocab.value_range
    token_id, text, value = vocab.largest_token()
    return (f"NTL kind={kind!r} (weight {weight:g}{', reweigh' if reweigh else ''}) on "
            f"number tokens valued {vmin:g}..{vmax:g} (mode {vocab.mode!r}; largest: token "
            f"{shown(text)}, id {token_id}, value {value:g})")


def _fixes(vocab: "NumberVocab", kind: str, squash_factor: Optional[float]) -> List[str]:
    fixes = []
    if kind != "was":
        fixes.append("use kind='was' (gradients ~ the value span, not its square)")
    if kind == "was" and squash_factor is None:
        fixes.append("set a squash_factor")
    if vocab.mode != "digits":
        fixes.append("use mode='digits'")
    return fixes
