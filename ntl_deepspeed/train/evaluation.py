"""Validation of the trainer: held-out CE (all tokens, non-number tokens, number tokens), NTL,
number-token accuracy and number MAE, reduced over data-parallel ranks.

The model runs in eval mode under ``torch.no_grad()`` without labels, so it returns logits (with
the fused head installed too: the head computes the loss only while training), and our op
(:func:`~ntl_deepspeed.ce_ntl`, ``reduction="none"``) turns them into per-token statistics:
the vocab-parallel layout (AutoTP) is handled as in training. The NTL reported is the run's
``"ntl"`` kind even when its weight is 0 or ``--plain-ce`` trains. Sums stay on the device;
one all-reduce over the DP group per evaluation (:class:`EvalMetrics`).
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from ..loss import CENTLOutput, ce_ntl
from ..metrics import SUMS, output_sums, summarize
from ..parallel import group_size

EVAL_SUMS = SUMS + ("ce_non_number_sum", "non_number_tokens", "ce_number_sum")


def eval_sums(out: CENTLOutput) -> torch.Tensor:
    """:data:`EVAL_SUMS` of one output (fp64, on its device): the training sums plus CE summed
    over valid labels that are not number tokens of the vocab, their count, and CE summed over
    number-token labels."""
    with torch.no_grad():
        numbers = out.number_token_label & out.valid_mask
        text = out.valid_mask & ~out.number_token_label
        extra = torch.stack([(out.ce_per_token * text).sum(), text.sum(),
                             (out.ce_per_token * numbers).sum()]).double()
        return torch.cat([output_sums(out), extra])


def summarize_eval(values) -> Dict[str, float]:
    """Per-token means of :data:`EVAL_SUMS` (``ce``: all valid tokens)."""
    base = summarize(values[:len(SUMS)])
    tokens, numbers = values[2], values[3]
    ce_text, n_text, ce_numbers = values[len(SUMS):]
    return {**base, "ce_non_number": ce_text / max(n_text, 1),
            "ce_number": ce_numbers / max(numbers, 1), "tokens": tokens,
            "number_labels": numbers}


class EvalMetrics:
    """Accumulates :func:`eval_sums` until :meth:`reduce` (one all-reduce over ``dp_group``)."""

    def __init__(self, device="cpu"):
        self.device = device
        self.sums = torch.zeros(len(EVAL_SUMS), dtype=torch.float64, device=device)

    def __call__(self, out: CENTLOutput) -> None:
        self.sums = self.sums + eval_sums(out).to(self.sums.device)

    def reduce(self, dp_group=None) -> Dict[str, float]:
        sums = self.sums
        if group_size(dp_group) > 1:
            dist.all_reduce(sums, group=dp_group)
        self.sums = torch.zeros_like(sums)
        return summarize_eval(sums.tolist())


def shift_left(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    from ..patches.hf_loss import shift_left as shift  # as transformers shifts

    return shift(labels, ignore_index)


def _agreed_count(n: int, device) -> int:
    """The largest ``n`` over all ranks: every rank must run as many forwards (ZeRO-3 gathers
    parameters collectively)."""
    t = torch.tensor([n], dtype=torch.long, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


class Evaluator:
    """Runs evaluations of a :class:`~ntl_deepspeed.train.trainer.Trainer` on its held-out
    batches and logs them (``metrics.jsonl`` rows with ``"split": "eval"``, DeepSpeed's monitor
    as ``Eval/ntl/<name>``)."""

    def __init__(self, trainer, batches: List, every: int):
        self.trainer = trainer
        self.batches = batches
        self.every = every
        self.history: List[Dict[str, float]] = []
        engine = trainer.engine
        self.n_batches = _agreed_count(len(batches), engine.device)  # 0: no eval anywhere

    @property
    def enabled(self) -> bool:
        return self.n_batches > 0

    def due(self, steps_done: int) -> bool:
        return self.enabled and self.every > 0 and steps_done % self.every == 0

    def _dummy(self, ignore_index: int):
        """A batch without labels for a rank with fewer eval batches than the others."""
        width = self.trainer.args.seq_len + 1
        ids = torch.zeros((1, width), dtype=torch.long)
        return ids, torch.full_like(ids, ignore_index)

    @torch.no_grad()
    def run(self, steps_done: int) -> Optional[Dict[str, float]]:
        """Evaluate now (every rank), log and return the row."""
        from ..integrations.deepspeed import model_layout

        if not self.enabled:
            return None
        t = self.trainer
        engine, config = t.engine, t.ntl.replace(enabled=True)
        layout = model_layout(engine.module)
        metrics = EvalMetrics(engine.device)
        t0 = time.perf_counter()
        was_training = engine.module.training
        engine.eval()
        try:
            for i in range(self.n_batches):
                ids, labels = self.batches[i] if i < len(self.batches) else \
                    self._dummy(config.ignore_index)
                ids, labels = ids.to(engine.device), labels.to(engine.device)
                logits = engine(input_ids=ids, use_cache=False).logits
                shard = t.vocab.shard_for(logits.shape[-1], layout.tp_group,
                                          layout.vocab_start_index, logits.device)
                metrics(ce_ntl(shift_left(labels, config.ignore_index), shard, config,
                               logits=logits, reduction="none"))
        finally:
            engine.train(was_training)
        row = {"step": steps_done - 1, "split": "eval", **metrics.reduce(t.dp_group),
               "eval_s": time.perf_counter() - t0}
        self.history.append(row)
        self.log(row)
        return row

    def log(self, row: Dict[str, float]) -> None:
        self.trainer.log(row, tag="Eval")


def eval_line(row: Dict[str, float]) -> str:
    """One line for the progress bar."""
    return (f"eval after step {row['step'] + 1}: CE {row['ce']:.4g} (non-number "
            f"{row['ce_non_number']:.4g}, number {row['ce_number']:.4g}), NTL {row['ntl']:.4g}, "
            f"number accuracy {row['number_accuracy']:.3f}, number MAE {row['number_mae']:.4g}")
