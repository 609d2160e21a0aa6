"""Per-step training metrics of CE + NTL, reduced over data-parallel ranks."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..loss import CENTLOutput


@dataclass
class StepMetrics:
    """Sums over one rank's micro-batch (so that a DP all-reduce gives global values)."""

    ce_sum: float
    ntl_sum: float
    valid_tokens: float
    number_labels: float
    number_correct: float
    number_abs_error: float

    @classmethod
    def from_output(cls, out: CENTLOutput) -> "StepMetrics":
        with torch.no_grad():
            numbers = out.number_token_label
            abs_err = ((out.predicted_value - out.label_value).abs() * numbers).sum()
            return cls(float((out.ce_per_token * out.valid_mask).sum()),
                       float((out.ntl_per_token * out.number_label_mask).sum()),
                       float(out.valid_mask.sum()), float(numbers.sum()),
                       float((out.number_correct & numbers).sum()), float(abs_err))


def reduce_metrics(m: StepMetrics, dp_group, seconds: float) -> dict:
    """Global CE, NTL, number accuracy / MAE and tokens/s over the DP group."""
    t = torch.tensor([m.ce_sum, m.ntl_sum, m.valid_tokens, m.number_labels, m.number_correct,
                      m.number_abs_error], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(t, group=dp_group)
    ce, ntl, tokens, numbers, correct, abs_err = t.tolist()
    # ntl: per number label (for number_level, the per-number sum over digit labels)
    return {"ce": ce / max(tokens, 1), "ntl": ntl / max(numbers, 1),
            "number_accuracy": correct / max(numbers, 1), "number_mae": abs_err / max(numbers, 1),
            "tokens_per_s": tokens / max(seconds, 1e-9)}
