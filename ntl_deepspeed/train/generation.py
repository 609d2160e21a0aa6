"""``--generate-eval N``: greedy answers of the trained model to arithmetic prompts.

Prompts are the corpus' bare statements without their result (``"17 + 25 ="``, ``"946 - 726 ="``,
``"54 * 9 ="``; "+", "-", "*" in turn), drawn from the *held-out problems*
(:func:`~ntl_deepspeed.train.data.corpus.arithmetic_prompts`) when the run holds problems out
(embedded corpus, ``--eval-split problems``, ``--eval-fraction > 0``): the model never saw them in
any wording. Each prompt is preceded by EOS (a sentence starts after EOS in training).

Under ZeRO-3 every rank takes part in every forward (the parameters are gathered layer by layer,
collectively): all ranks build the same prompt list, group it by token length (no padding), and
each DP rank decodes its round-robin share of each group -- a rank without rows in a group
decodes a copy of the group's first row and drops it -- for a fixed number of new tokens (no
early stop, so every rank makes the same calls). Under AutoTP the next token is the argmax over
all vocab shards (one all-reduce of (value, id) per step). Ids past the tokenizer (vocab padding)
are never chosen. The text up to the first EOS is the answer; its first integer is parsed.
Rank 0 writes ``generation.json``: exact match, MAE and median absolute error (an answer
without a number counts as 0), the share of answers with a number, the same per operation, and
every sample.
"""
from __future__ import annotations

import json
import re
import statistics
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

MAX_NEW_TOKENS = 8
_INT = re.compile(r"-?\d+")


def parse_answer(text: str) -> Optional[int]:
    """The first integer of ``text`` (None if there is none)."""
    m = _INT.search(text)
    return int(m.group()) if m else None


def _next_tokens(logits: torch.Tensor, tp_group, start: Optional[int], limit: int) -> torch.Tensor:
    """Greedy next token per row from ``logits`` [rows, V_local] (a vocab shard under TP)."""
    from ..parallel import group_size

    start = start or 0
    ids = torch.arange(start, start + logits.shape[-1], device=logits.device)
    logits = logits.float().masked_fill(ids >= limit, float("-inf"))
    best, arg = logits.max(-1)
    if group_size(tp_group) <= 1:
        return arg + start
    # (best value, -global id): MAX picks the highest logit, ties to the smallest id
    both = torch.stack([best.double(), -(arg + start).double()], -1)
    gathered = [torch.empty_like(both) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(gathered, both, group=tp_group)
    stacked = torch.stack(gathered)  # [tp, rows, 2]
    top = stacked[..., 0].max(0).values
    cand = torch.where(stacked[..., 0] == top, stacked[..., 1], torch.full_like(top, -1e18))
    return (-cand.max(0).values).long()


def summarize_answers(samples: List[Dict]) -> Dict[str, float]:
    """Exact match; MAE and median |error| over all samples (an answer without a number counts
    as 0); the share of answers holding a number."""
    errors = [abs((s["parsed"] if s["parsed"] is not None else 0) - s["answer"]) for s in samples]
    n = max(len(samples), 1)
    return {"n": len(samples),
            "exact_match": sum(s["parsed"] == s["answer"] for s in samples) / n,
            "mae": statistics.fmean(errors) if errors else float("nan"),
            "median_abs_error": statistics.median(errors) if errors else float("nan"),
            "parsed": sum(s["parsed"] is not None for s in samples) / n}


@torch.no_grad()
def generate_eval(trainer, n: int, path: str) -> Optional[Dict]:
    """Decode ``n`` arithmetic prompts with ``trainer``'s model (every rank calls this); rank 0
    writes ``path`` and gets the result, the other ranks None."""
    from ..integrations.deepspeed import model_layout
    from .data.corpus import arithmetic_prompts
    from .data.encode import text_decoder, text_encoder

    args = trainer.args
    held_out = args.held_out_problems
    prompts = arithmetic_prompts(n, args.eval_fraction if held_out else 0.0)
    encode, eos = text_encoder(trainer.tokenizer)
    decode = text_decoder(trainer.tokenizer)
    engine = trainer.engine
    layout = model_layout(engine.module)
    limit = trainer.vocab.tokenizer_size
    encoded = [[eos] + list(encode(p)) for p, _, _ in prompts]
    groups: Dict[int, List[int]] = {}
    for i, ids in enumerate(encoded):
        groups.setdefault(len(ids), []).append(i)
    mine: Dict[int, List[int]] = {}
    was_training = engine.module.training
    engine.eval()
    try:
        for length in sorted(groups):
            rows = groups[length][trainer.dp_rank::trainer.dp_size]
            batch = torch.tensor([encoded[i] for i in (rows or groups[length][:1])],
                                 device=engine.device)
            for _ in range(MAX_NEW_TOKENS):
                logits = engine(input_ids=batch, use_cache=False).logits[:, -1]
                nxt = _next_tokens(logits, layout.tp_group, layout.vocab_start_index, limit)
                batch = torch.cat([batch, nxt[:, None].to(batch.dtype)], 1)
            for i, seq in zip(rows, batch[:, length:].tolist()):
                mine[i] = seq[:seq.index(eos)] if eos in seq else seq
    finally:
        engine.train(was_training)
    everything: List[Dict[int, List[int]]] = [None] * dist.get_world_size()
    dist.all_gather_object(everything, mine)
    if dist.get_rank() != 0:
        return None
    generated = {i: seq for part in everything for i, seq in part.items()}
    samples = []
    for i, (prompt, answer, op) in enumerate(prompts):
        text = decode(generated[i])
        samples.append({"prompt": prompt, "answer": answer, "op": op, "generated": text,
                        "parsed": parse_answer(text)})
    result = {"held_out": held_out, "max_new_tokens": MAX_NEW_TOKENS,
              **summarize_answers(samples),
              "per_op": {op: summarize_answers([s for s in samples if s["op"] == op])
                         for op in sorted({s["op"] for s in samples})},
              "samples": samples}
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return result
