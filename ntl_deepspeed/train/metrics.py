"""Per-step training metrics of CE + NTL, reduced over data-parallel ranks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..loss import CENTLOutput
from ..parallel import group_size


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
    def total(cls, outputs) -> "StepMetrics":
        """Summed over the micro-batches (outputs) of one optimizer step."""
        parts = [cls.from_output(o) for o in outputs]
        return cls(*(sum(getattr(p, f) for p in parts) for f in cls.__dataclass_fields__))

    @classmethod
    def from_output(cls, out: CENTLOutput) -> "StepMetrics":
        with torch.no_grad():
            numbers = out.number_token_label
            abs_err = ((out.predicted_value - out.label_value).abs() * numbers).sum()
            return cls(float((out.ce_per_token * out.valid_mask).sum()),
                       float((out.ntl_per_token * out.number_label_mask).sum()),
                       float(out.valid_mask.sum()), float(numbers.sum()),
                       float((out.number_correct & numbers).sum()), float(abs_err))


def reduce_metrics(loss: torch.Tensor, m: Optional[StepMetrics], dp_group, seconds: float,
                   input_tokens: int) -> dict:
    """Loss (DP mean), global CE, NTL, number accuracy / MAE and tokens/s over the DP group.
    Without NTL metrics (``m`` None: the model's own loss, or ``log_metrics`` off) only loss and
    tokens/s."""
    vals = [float(loss), float(input_tokens)] + ([] if m is None else [
        m.ce_sum, m.ntl_sum, m.valid_tokens, m.number_labels, m.number_correct,
        m.number_abs_error])
    t = torch.tensor(vals, dtype=torch.float64, device=loss.device)  # nccl: device tensors
    dp = group_size(dp_group)
    if dp > 1:
        dist.all_reduce(t, group=dp_group)
    out = {"loss": t[0].item() / dp, "tokens_per_s": t[1].item() / max(seconds, 1e-9)}
    if m is None:
        return out
    ce, ntl, tokens, numbers, correct, abs_err = t[2:].tolist()
    # ntl: per number label (for number_level, the per-number sum over digit labels)
    out.update({"ce": ce / max(tokens, 1), "ntl": ntl / max(numbers, 1),
                "number_accuracy": correct / max(numbers, 1),
                "number_mae": abs_err / max(numbers, 1)})
    return out
