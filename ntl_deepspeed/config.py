"""Options of the number token loss, shared by every path (reference, fused op, integrations)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

KINDS = ("was", "mse", "l1", "huber", "number_level")
DOT_PRODUCT_KINDS = ("mse", "l1", "huber", "number_level")
NORMALIZATIONS = ("micro_batch", "global", "token")
REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class NTLConfig:
    """What NTL to add to the cross-entropy.

    kind: ``was`` (Wasserstein-1, the paper's NTL-WAS), ``mse`` / ``l1`` / ``huber`` (NTL-Lp on the
        expected value), ``number_level`` (the reference's NumberLevelLoss: symmetric MAPE of whole
        numbers assembled from digit predictions).
    weight: lambda in ``CE + lambda * NTL``.
    reweigh: scale by the full-vocab probability mass on number tokens (ntloss default True; the
        paper and we default to False).
    squash_factor: > 1, WAS only: nonzero distances mapped linearly onto ``[1, squash_factor]``.
    normalization: how the summed NTL of a call is divided (reduction ``mean``): ``micro_batch``
        (by the summed weights of number labels in this call; the reference), ``global`` (by that
        count summed over the data-parallel group: one big batch, assuming gradients are averaged
        over DP ranks), ``token`` (by the CE's count of valid tokens).
    float_level: number_level only: a '.' between digits joins them into one number.
    """

    kind: str = "was"
    weight: float = 0.3
    reweigh: bool = False
    squash_factor: Optional[float] = None
    normalization: str = "micro_batch"
    ignore_index: int = -100
    float_level: bool = False
    enabled: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"NTLConfig.kind={self.kind!r}: expected one of {KINDS}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"NTLConfig.normalization={self.normalization!r}: expected one of {NORMALIZATIONS}")
        if self.squash_factor is not None:
            if self.kind != "was":
                raise ValueError("NTLConfig.squash_factor applies to kind='was' only")
            if not self.squash_factor > 1:
                raise ValueError(f"NTLConfig.squash_factor={self.squash_factor}: must be > 1")
        if not (self.weight >= 0 and self.weight < float("inf")):
            raise ValueError(f"NTLConfig.weight={self.weight}: must be a finite number >= 0")
        if self.float_level and self.kind != "number_level":
            raise ValueError("NTLConfig.float_level applies to kind='number_level' only")

    @classmethod
    def from_dict(cls, d: dict) -> "NTLConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown NTL option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)
