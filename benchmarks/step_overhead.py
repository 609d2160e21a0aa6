"""Step time of the same ZeRO-3 job with NTL off vs on (and with AutoTP 2, and with the fused
head), as ratios; peak resident memory per rank alongside.

Uses Mistral's real 32000-token vocabulary so the LM head and loss have a realistic share of the
step. Runs alternate (off, on, tp2, off, on, tp2, ...) so drift in machine load hits all alike;
the median step time after warm-up is compared. Writes benchmarks/results/step_overhead.json.

    python benchmarks/step_overhead.py [--steps 40] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

from _harness import ROOT, mistral_tokenizer, run_pretrain, write_json

MODEL = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512,
         "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def with_fused_head(config: str, tmp: str) -> str:
    """A copy of ``config`` with ``"ntl": {"fused_head": true}``."""
    with open(config) as f:
        cfg = json.load(f)
    cfg["ntl"]["fused_head"] = True
    path = os.path.join(tmp, "fused_" + os.path.basename(config))
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                  "step_overhead.json"))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="ntl_overhead_")
    model = os.path.join(tmp, "model.json")
    with open(model, "w") as f:
        json.dump(MODEL, f)
    tok = mistral_tokenizer()
    common = ["--tokenizer", tok, "--steps", str(args.steps), "--seq-len", str(args.seq_len),
              "--corpus-sentences", "4000"]
    dp_config = os.path.join(ROOT, "configs", "zero3_cpu_tiny.json")
    tp_config = os.path.join(ROOT, "configs", "zero3_cpu_autotp2.json")
    variants = {
        "ntl_off": (dp_config, ["--plain-ce"]),
        "ntl_on": (dp_config, []),
        "ntl_on_fused_head": (with_fused_head(dp_config, tmp), []),
        "ntl_on_autotp2": (tp_config, []),
        "ntl_on_autotp2_fused_head": (with_fused_head(tp_config, tmp), []),
    }
    step_times = {k: [] for k in variants}
    peak_rss_mb = {k: 0.0 for k in variants}
    for r in range(args.rounds):
        for name, (config, extra) in variants.items():
            out = os.path.join(tmp, f"{name}_{r}")
            res = run_pretrain(out, config, model, *common, *extra)
            step_times[name] += [row["step_s"] for row in res["rows"][args.warmup:]]
            peak_rss_mb[name] = max(peak_rss_mb[name], res["info"]["peak_rss_mb_max_rank"])
            print(name, r, f"{statistics.median(step_times[name]) * 1e3:.1f} ms/step", flush=True)
    med = {k: statistics.median(v) for k, v in step_times.items()}
    result = {
        "vocab": "mistral tokenizer.model.v1 (32000)", "model": MODEL, "seq_len": args.seq_len,
        "micro_batch": "8 per DP rank (DP 2) / 16 (AutoTP 2)", "steps_per_run": args.steps,
        "warmup_skipped": args.warmup, "rounds": args.rounds,
        "median_step_s": med,
        "ratio_ntl_on_vs_off": med["ntl_on"] / med["ntl_off"],
        "ratio_ntl_on_autotp2_vs_off": med["ntl_on_autotp2"] / med["ntl_off"],
        "ratio_fused_head_vs_materialised": med["ntl_on_fused_head"] / med["ntl_on"],
        "ratio_fused_head_vs_materialised_autotp2":
            med["ntl_on_autotp2_fused_head"] / med["ntl_on_autotp2"],
        "peak_rss_mb_max_rank": peak_rss_mb,
        "target": "ntl_on / ntl_off <= 1.03",
    }
    write_json(result, args.out)


if __name__ == "__main__":
    main()
