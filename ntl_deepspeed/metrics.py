"""CE + NTL metrics: summed on the device per micro-batch, reduced over data-parallel ranks.

:class:`NTLMetrics` is an ``on_output`` callback: it adds each :class:`CENTLOutput`'s sums to a
device tensor (no host synchronisation), and :meth:`NTLMetrics.reduce` makes one all-reduce over
the DP group and one host read when the numbers are logged.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist

from .loss import CENTLOutput
from .parallel import group_size

SUMS = ("ce_sum", "ntl_sum", "valid_tokens", "number_labels", "number_correct",
        "number_abs_error")


def output_sums(out: CENTLOutput) -> torch.Tensor:
    """The :data:`SUMS` of one output, as an fp64 device tensor."""
    with torch.no_grad():
        numbers = out.number_token_label
        return torch.stack([
            (out.ce_per_token * out.valid_mask).sum(), (out.ntl_per_token * out.number_label_mask).sum(),
            out.valid_mask.sum(), numbers.sum(), (out.number_correct & numbers).sum(),
            ((out.predicted_value - out.label_value).abs() * numbers).sum()]).double()


def summarize(sums) -> Dict[str, float]:
    """CE per valid token, NTL per number label (number_level: per-number sum over digit labels),
    number-token accuracy and mean |y-hat - y| at number labels."""
    ce, ntl, tokens, numbers, correct, abs_err = sums
    return {"ce": ce / max(tokens, 1), "ntl": ntl / max(numbers, 1),
            "number_accuracy": correct / max(numbers, 1), "number_mae": abs_err / max(numbers, 1)}


class NTLMetrics:
    """Accumulates CE/NTL sums of every output until :meth:`reduce`."""

    def __init__(self, device="cpu"):
        self._sums: Optional[torch.Tensor] = None
        self._device = device  # of the all-reduce when no output was seen (nccl: a GPU)

    def __call__(self, out: CENTLOutput) -> None:
        sums = output_sums(out)
        self._sums = sums if self._sums is None else self._sums + sums

    def reduce(self, dp_group=None, **extra: float) -> Dict[str, float]:
        """Metrics summed over ``dp_group`` since the last call (then cleared), and every
        ``extra`` value summed over the group too, in one all-reduce of a fixed size (a rank
        that saw no output still takes part). Without any output on any rank: only ``extra``."""
        device = self._sums.device if self._sums is not None else self._device
        sums = self._sums if self._sums is not None else torch.zeros(
            len(SUMS), dtype=torch.float64, device=device)
        t = torch.cat([torch.tensor([float(v) for v in extra.values()], dtype=torch.float64,
                                    device=device), sums])
        if group_size(dp_group) > 1:
            dist.all_reduce(t, group=dp_group)
        values = t.tolist()
        self._sums = None
        out = dict(zip(extra, values[:len(extra)]))
        if any(values[len(extra):]):
            out.update(summarize(values[len(extra):]))
        return out
