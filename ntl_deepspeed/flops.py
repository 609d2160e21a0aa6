"""Book the fused CE+NTL op's work into DeepSpeed's flops profiler.

The profiler counts patched ``torch.nn.functional`` calls and misses our op (``torch.*`` calls
inside an autograd Function). When a profile is running, :func:`record_ce_ntl_flops` appends the
op's forward flops to the innermost module being profiled (the causal LM whose forward calls the
loss); like every entry there, the profiler reports backward as 2x forward. Uses the profiler's
module-level ``module_flop_count`` (internal API of deepspeed 0.19.x).
"""
from __future__ import annotations

import sys

FLOPS_PER_LOGIT = 4          # max, subtract, exp, sum (forward)
FLOPS_PER_NUMBER_LOGIT = 12  # number-token softmax, value / distance sums, loss


def ce_ntl_forward_flops(tokens: int, vocab_local: int, numbers_local: int) -> int:
    return FLOPS_PER_LOGIT * tokens * vocab_local + FLOPS_PER_NUMBER_LOGIT * tokens * numbers_local


_root_module = None


def book_into_root(module) -> None:
    """Fallback target: the model DeepSpeed's engine profiles. The engine starts the profile from
    inside the model's own forward pre-hooks, so the model's frame is never opened and a loss
    computed in its forward (after its children returned) finds no frame; it is added to the
    model's ``__flops__`` (present only while a profile is running) instead."""
    global _root_module
    _root_module = module


def record_ce_ntl_flops(tokens: int, vocab_local: int, numbers_local: int) -> int:
    """Add the op's flops to a running DeepSpeed flops profile; returns what was added."""
    profiler = sys.modules.get("deepspeed.profiling.flops_profiler.profiler")
    if profiler is None:
        return 0
    flops = ce_ntl_forward_flops(tokens, vocab_local, numbers_local)
    if profiler.module_flop_count:
        profiler.module_flop_count[-1].append(("ntl_deepspeed.ce_ntl", flops))
    elif _root_module is not None and hasattr(_root_module, "__flops__"):
        _root_module.__flops__ += flops
    else:
        return 0
    return flops
