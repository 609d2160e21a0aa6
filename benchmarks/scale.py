"""One ZeRO-3 training step with NTL on the largest Llama this 24 GB, 2-core machine holds.

Llama-3.2-1B-like shapes (configs/model/llama_1b.json) with Mistral's 32000-token vocabulary:
1.04 B parameters, bf16, SGD (AdamW states would not fit), 2 ranks, sequence 128. Also prints
DeepSpeed's ZeRO-3 model-state memory estimates for the 3B and 8B configs (no model needed).
Writes benchmarks/results/scale.json.

    python benchmarks/scale.py [--steps 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

from _launch import ROOT, mistral_tokenizer, run_pretrain, write_json

VOCAB = 32000


def llama_params(cfg: dict, vocab: int = VOCAB):
    """(total parameters, largest layer's parameters) of a Llama config."""
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = h * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    embed = vocab * h * (1 if cfg.get("tie_word_embeddings") else 2)
    return layers * per_layer + embed + h, max(vocab * h, 3 * h * i)


def estimates():
    """DeepSpeed's own ZeRO-3 model-state estimates (its printed table), 1 node x 8 GPUs."""
    import contextlib
    import io

    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    out = {}
    for name in ("3b", "8b"):
        with open(os.path.join(ROOT, "configs", "model", f"llama_{name}.json")) as f:
            cfg = json.load(f)
        total, largest = llama_params(cfg, 128256)  # Llama-3 vocabulary
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            estimate_zero3_model_states_mem_needs_all_cold(total, largest, num_gpus_per_node=8,
                                                           num_nodes=1)
        out[f"llama_{name}"] = {"parameters": total, "largest_layer_parameters": largest,
                                "deepspeed_estimate": text.getvalue().strip().splitlines()}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "scale.json"))
    args = ap.parse_args()
    out_dir = tempfile.mkdtemp(prefix="ntl_scale_")
    res = run_pretrain(out_dir, os.path.join(ROOT, "configs", "zero3_cpu_scale_bf16_sgd.json"),
                       os.path.join(ROOT, "configs", "model", "llama_1b.json"),
                       "--tokenizer", mistral_tokenizer(), "--steps", str(args.steps),
                       "--seq-len", str(args.seq_len), "--corpus-sentences", "500",
                       timeout=3600)
    rows = res["rows"]
    result = {
        "model": "configs/model/llama_1b.json + 32000 vocab", "ranks": 2, "dtype": "bf16",
        "optimizer": "SGD", "seq_len": args.seq_len, "micro_batch": 1,
        "parameters": res["info"]["parameters"],
        "peak_rss_mb_per_rank_max": res["info"]["peak_rss_mb_max_rank"],
        "peak_rss_mb_sum": res["info"]["peak_rss_mb_sum"],
        "step_s": [r["step_s"] for r in rows],
        "median_step_s": statistics.median(r["step_s"] for r in rows),
        "loss": [r["loss"] for r in rows], "ntl": [r.get("ntl") for r in rows],
        "deepspeed_estimates": estimates(),
    }
    write_json(result, args.out)


if __name__ == "__main__":
    main()
