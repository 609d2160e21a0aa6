"""Per-token NTL formulas, shared by the single-device reference and every op."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..config import REWEIGH_MARGIN


def number_distance(values: torch.Tensor, target: torch.Tensor,
                    squash: Optional[Tuple[float, float, float]] = None) -> torch.Tensor:
    """WAS ground cost ``D(v, y) = |v - y|``; with ``squash = (factor, d_min, d_max)`` nonzero
    distances map linearly from ``[d_min, d_max]`` onto ``[1, factor]``."""
    d = (values - target).abs()
    if squash is None:
        return d
    factor, d_min, d_max = squash
    scaled = 1 + (d - d_min) * ((factor - 1) / (d_max - d_min))
    return torch.where(d == 0, torch.zeros_like(d), scaled)


def dot_product_loss(kind: str, yhat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """NTL-Lp on the expected value: ``mse`` / ``l1`` / ``huber`` (delta 1) of ``yhat - y``."""
    e = yhat - y
    if kind == "mse":
        return e * e
    if kind == "l1":
        return e.abs()
    if kind == "huber":
        a = e.abs()
        return torch.where(a < 1, 0.5 * e * e, a - 0.5)
    raise ValueError(f"not a dot-product NTL kind: {kind!r}")


def dot_product_loss_grad(kind: str, yhat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d dot_product_loss / d yhat (autograd's convention at kinks: sign(0) = 0)."""
    e = yhat - y
    if kind == "mse":
        return 2 * e
    if kind == "l1":
        return torch.sign(e)
    if kind == "huber":
        return e.clamp(-1, 1)
    raise ValueError(f"not a dot-product NTL kind: {kind!r}")


def worst_loss(max_distance: float) -> float:
    """What reweighing charges for probability mass placed off number tokens."""
    return REWEIGH_MARGIN * max_distance


def reweigh(loss: torch.Tensor, mass: torch.Tensor, max_distance: float) -> torch.Tensor:
    """Blend toward the worst loss by the probability mass placed off number tokens."""
    return mass * loss + worst_loss(max_distance) * (1 - mass)


LOG2E = 1.4426950408889634


def row_shift(z: torch.Tensor) -> torch.Tensor:
    """Each row's maximum ``[rows, 1]``, 0 where it is not finite (an all ``-inf`` row): the
    shift that keeps ``exp(z - shift)`` in range."""
    top = z.amax(-1, keepdim=True)
    return torch.where(torch.isfinite(top), top, torch.zeros_like(top))


def exp_shifted(x: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = exp(x - shift)`` (``shift`` broadcast, e.g. one per row) as
    ``exp2((x - shift) * log2(e))``: the vectorised exp2 is several times faster than exp on
    CPU; the scaling of the (already small) difference adds ~1e-7 relative error to the
    exponent. ``shift = +inf`` gives 0. ``out`` may be ``x``."""
    return torch.sub(x, shift, out=out).mul_(LOG2E).exp2_()
