"""What does NTL do in pretraining? CE vs CE + 0.3 NTL-WAS vs CE + 0.3 NTL-MSE through our trainer.

A small Llama (``configs/model/llama_pretrain_effect.json``: 4 layers, hidden 192, ~2.0 M
parameters with the 512-token corpus tokenizer) is pretrained from scratch by the real trainer
(``launch/pretrain.py`` under the deepspeed launcher: ZeRO-3, 2 CPU ranks) on the embedded corpus
of text with quantities and arithmetic, for a FIXED number of steps. 10 % of the arithmetic
*problems* are held out (``--eval-fraction 0.1 --eval-split problems``: operation and operand
pair, in every wording, never trained on); other sentences are held out by index.

Losses, all computed by our op (``"ntl"`` section): CE = ``--ntl-weight 0`` (the same op, NTL
weight 0), CE + 0.3 NTL-WAS, CE + 0.3 NTL-MSE. Seeds are paired: for a given seed the three runs
share the corpus, the tokenizer, the initial weights and the batch order (``--seed``).

Held-out metrics (the trainer's final evaluation, DP-reduced): CE on non-number tokens (does NTL
hurt text?), CE on number tokens, number-token accuracy, number MAE (|E[value] - label| at digit
labels); and greedy answers to held-out arithmetic prompts (``--generate-eval``, "17 + 25 ="):
exact match and MAE of the parsed number. Paired differences against CE with 95 % t-intervals.
Writes ``benchmarks/results/pretrain_effect.{json,md,png}`` (``--smoke``: ``pretrain_effect_smoke``).

    python benchmarks/pretrain_effect.py            # full: 5 seeds x 3 losses, run it alone
    python benchmarks/pretrain_effect.py --smoke    # 2 seeds, a few steps: checks the pipeline
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._harness import run_pretrain  # noqa: E402
from benchmarks._stats import mean_sd, t_interval  # noqa: E402

LOSSES = {"ce": {"kind": "was", "weight": 0.0}, "ce+ntl_was": {"kind": "was", "weight": 0.3},
          "ce+ntl_mse": {"kind": "mse", "weight": 0.3}}
# (key, label, lower is better)
EVAL_METRICS = [("ce_non_number", "CE non-number tokens", True),
                ("ce_number", "CE number tokens", True),
                ("number_accuracy", "number-token accuracy", False),
                ("number_mae", "number MAE (E[value] at digit labels)", True)]
GEN_METRICS = [("gen_exact_match", "generated exact match", False),
               ("gen_mae", "generated answer MAE", True),
               ("gen_median_abs_error", "generated answer median abs. error", True)]
METRICS = EVAL_METRICS + GEN_METRICS


def ds_config(loss: str, steps: int, micro_batch: int, lr: float) -> dict:
    ntl = {"enabled": True, "mode": "digits", "normalization": "micro_batch", **LOSSES[loss]}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "steps_per_print": 10 ** 6,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.95],
                                                  "weight_decay": 0.01, "torch_adam": True}},
        "scheduler": {"type": "WarmupDecayLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_num_steps": max(1, steps // 10),
            "total_num_steps": steps}},
        "zero_optimization": {"stage": 3, "memory_efficient_linear": False,
                              "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": False},
        "ntl": ntl,
    }


def one_run(loss: str, seed: int, args) -> dict:
    name = f"{loss}_seed{seed}"
    out = os.path.join(args.work_dir, name)
    done = os.path.join(out, "result.json")
    if args.reuse and os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    config = os.path.join(out, "ds_config.json")
    with open(config, "w") as f:
        json.dump(ds_config(loss, args.steps, args.micro_batch, args.lr), f, indent=1)
    t0 = time.time()
    got = run_pretrain(out, config, args.model, "--steps", str(args.steps), "--seq-len",
                       str(args.seq_len), "--seed", str(seed), "--corpus-sentences",
                       str(args.corpus_sentences), "--eval-fraction", str(args.eval_fraction),
                       "--eval-split", "problems", "--eval-every", str(args.eval_every),
                       "--eval-batches", str(args.eval_batches), "--generate-eval",
                       str(args.generate), timeout=3600)
    wall = time.time() - t0
    train = [r for r in got["rows"] if "split" not in r]
    evals = [r for r in got["rows"] if r.get("split") == "eval"]
    with open(os.path.join(out, "generation.json")) as f:
        gen = json.load(f)
    final = evals[-1]
    result = {"loss": loss, "seed": seed, "wall_s": wall,
              "parameters": got["info"]["parameters"],
              "median_step_s": statistics.median(r["step_s"] for r in train),
              "train_ce_last": statistics.fmean(r["ce"] for r in train[-max(1, len(train) // 10):]),
              **{k: final[k] for k, _, _ in EVAL_METRICS},
              "eval_ntl": final["ntl"], "eval_ce": final["ce"],
              "eval_tokens": final["tokens"], "eval_number_labels": final["number_labels"],
              "gen_exact_match": gen["exact_match"], "gen_mae": gen["mae"],
              "gen_median_abs_error": gen["median_abs_error"], "gen_parsed": gen["parsed"],
              "gen_per_op": gen["per_op"], "gen_held_out": gen["held_out"],
              "curve": [{"step": r["step"] + 1, **{k: r[k] for k, _, _ in EVAL_METRICS}}
                        for r in evals],
              "train_curve": [{"step": r["step"] + 1, "ce": r["ce"]} for r in train]}
    with open(done, "w") as f:
        json.dump(result, f, indent=1)
    return result


def summarize(runs, seeds):
    table, paired = {}, {}
    for name in LOSSES:
        rs = [r for r in runs if r["loss"] == name]
        table[name] = {m: mean_sd(r[m] for r in rs)
                       for m in [k for k, _, _ in METRICS] + ["gen_parsed", "median_step_s"]}
    base = {r["seed"]: r for r in runs if r["loss"] == "ce"}
    for name in LOSSES:
        if name != "ce":
            rs = {r["seed"]: r for r in runs if r["loss"] == name}
            paired[name] = {m: t_interval([rs[s][m] - base[s][m] for s in seeds])
                            for m, _, _ in METRICS}
    return table, paired


def verdicts(paired):
    """Plain sentences: which paired differences exclude 0 (separate) and which do not."""
    lines = []
    for name, p in paired.items():
        for key, label, lower_better in METRICS:
            mean, lo, hi = p[key]
            if not (lo == lo and hi == hi):  # one seed: no interval
                lines.append(f"- {name} vs CE, {label}: {mean:+.4g} (one seed, no interval)")
                continue
            if lo > 0 or hi < 0:
                better = (mean < 0) == lower_better
                lines.append(f"- {name} vs CE, {label}: **separates** — {mean:+.4g} "
                             f"[{lo:+.4g}, {hi:+.4g}], {'better' if better else 'worse'} "
                             f"than CE")
            else:
                lines.append(f"- {name} vs CE, {label}: does not separate — {mean:+.4g} "
                             f"[{lo:+.4g}, {hi:+.4g}] contains 0")
    return lines


def markdown(table, paired, runs, seeds, args, wall):
    params = runs[0]["parameters"]
    tokens = args.steps * args.micro_batch * 2 * args.seq_len
    lines = [f"Pretraining a {params / 1e6:.2f} M-parameter Llama "
             f"(`{os.path.relpath(args.model, ROOT)}`) from scratch with our trainer (ZeRO-3, 2 "
             f"CPU ranks) on the embedded corpus: {args.steps} steps x {args.micro_batch} x 2 "
             f"sequences x {args.seq_len} tokens ({tokens / 1e6:.2f} M training tokens), AdamW "
             f"{args.lr:g}, warm-up + linear decay; {len(seeds)} paired seeds (same corpus, "
             f"init and batch order for the three losses). {args.eval_fraction:.0%} of the "
             f"arithmetic problems held out (every wording); final held-out evaluation on "
             f"{int(runs[0]['eval_tokens'])} tokens ({int(runs[0]['eval_number_labels'])} digit "
             f"labels) per run; {args.generate} greedy answers to held-out prompts "
             f"(\"17 + 25 =\", \"-\", \"*\" in turn). Wall time of the runs {wall / 60:.1f} min.", "",
             "| loss | " + " | ".join(label for _, label, _ in METRICS) +
             " | answers with a number | step time |",
             "|---" * (len(METRICS) + 3) + "|"]
    for name, t in table.items():
        cells = [f"{t[k][0]:.4g} ± {t[k][1]:.2g}" for k, _, _ in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {t['gen_parsed'][0]:.3f} | {t['median_step_s'][0]:.2f} s |")
    lines += ["", "Paired differences vs CE (mean [95 % t-interval] over seeds):", "",
              "| loss | " + " | ".join(f"Δ {label}" for _, label, _ in METRICS) + " |",
              "|---" * (len(METRICS) + 1) + "|"]
    for name, p in paired.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{p[k][0]:+.4g} [{p[k][1]:+.4g}, {p[k][2]:+.4g}]" for k, _, _ in METRICS) + " |")
    lines += ["", "What separates (95 % interval excludes 0) and what does not:", "",
              *verdicts(paired), "",
              "Per seed (held-out number MAE / CE non-number / generated MAE):", ""]
    for name in LOSSES:
        rs = sorted((r for r in runs if r["loss"] == name), key=lambda r: r["seed"])
        lines.append(f"- {name}: " + ", ".join(
            f"seed {r['seed']}: {r['number_mae']:.3f} / {r['ce_non_number']:.3f} / "
            f"{r['gen_mae']:.1f}" for r in rs))
    lines += ["", "Number MAE is |E[value] - label| under the softmax over the 10 digit tokens, "
              "at digit labels; NTL-MSE trains exactly that expectation, NTL-WAS its expected "
              "distance. CE on non-number tokens is the text side: an increase would mean NTL "
              "costs language modelling. Generated answers: the first integer of the greedy "
              "continuation (an answer without a number counts as 0; share with a number in the "
              "table); the median |error| is the robust summary (a few runaway digit strings "
              "dominate the MAE)."]
    return "\n".join(lines)


def plot(runs, seeds, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(LOSSES, ["tab:blue", "tab:green", "tab:orange"]))
    panels = [("ce_non_number", "held-out CE, non-number tokens"),
              ("number_mae", "held-out number MAE"), ("number_accuracy", "number-token accuracy")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for ax, (key, title) in zip(axes[0], panels):
        for name in LOSSES:
            rs = [r for r in runs if r["loss"] == name]
            for r in rs:
                ax.plot([c["step"] for c in r["curve"]], [c[key] for c in r["curve"]], "o-",
                        color=colors[name], alpha=0.5, ms=3,
                        label=name if r["seed"] == seeds[0] else None)
        ax.set(title=title, xlabel="step")
        ax.legend()
    finals = [("number_mae", "final held-out number MAE"),
              ("ce_non_number", "final held-out CE, non-number"),
              ("gen_median_abs_error", "generated answers: median abs. error")]
    for ax, (key, title) in zip(axes[1], finals):
        for s in seeds:  # paired: one line per seed across the losses
            ys = [next(r[key] for r in runs if r["loss"] == n and r["seed"] == s) for n in LOSSES]
            ax.plot(range(len(LOSSES)), ys, "-", color="gray", alpha=0.4)
            ax.scatter(range(len(LOSSES)), ys, c=[colors[n] for n in LOSSES], zorder=3)
        ax.set_xticks(range(len(LOSSES)), list(LOSSES))
        ax.set(title=title + " (lines: seeds)")
        if key.startswith("gen_"):
            ax.set_yscale("symlog", linthresh=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5, help="paired seeds 0..N-1")
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps per run")
    ap.add_argument("--micro-batch", type=int, default=8, help="sequences per rank per step")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    ap.add_argument("--corpus-sentences", type=int, default=60000, help="embedded corpus size")
    ap.add_argument("--eval-fraction", type=float, default=0.1,
                    help="share of arithmetic problems (and other sentences) held out")
    ap.add_argument("--eval-every", type=int, default=100, help="held-out evaluation period")
    ap.add_argument("--eval-batches", type=int, default=8, help="eval micro-batches per rank")
    ap.add_argument("--generate", type=int, default=300, help="held-out prompts to answer")
    ap.add_argument("--model", default=os.path.join(ROOT, "configs", "model",
                                                    "llama_pretrain_effect.json"))
    ap.add_argument("--smoke", action="store_true",
                    help="2 seeds, 6 steps, the tiny Llama: checks the pipeline in ~2-3 min")
    ap.add_argument("--reuse", action="store_true",
                    help="keep runs already finished in --work-dir (resume an interrupted sweep)")
    ap.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "pretrain_effect"))
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args()
    if args.smoke:
        args.seeds = min(args.seeds, 2)
        args.steps, args.seq_len, args.corpus_sentences = 6, 32, 3000
        args.eval_every, args.eval_batches, args.generate = 3, 2, 12
        args.model = os.path.join(ROOT, "configs", "model", "llama_tiny.json")
    seeds = list(range(args.seeds))
    runs = []
    for seed in seeds:  # interleaved, one run at a time: machine drift hits every loss alike
        for loss in LOSSES:
            r = one_run(loss, seed, args)
            runs.append(r)
            print(f"{loss:>11} seed {seed}: number MAE {r['number_mae']:.3f}, CE non-number "
                  f"{r['ce_non_number']:.3f}, number acc {r['number_accuracy']:.3f}, generated "
                  f"exact {r['gen_exact_match']:.3f} MAE {r['gen_mae']:.1f} "
                  f"({r['wall_s']:.0f} s)", flush=True)
    wall = sum(r["wall_s"] for r in runs)  # of the runs (also when --reuse kept some)
    table, paired = summarize(runs, seeds)
    md = markdown(table, paired, runs, seeds, args, wall)
    stem = "pretrain_effect_smoke" if args.smoke else "pretrain_effect"
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, f"{stem}.json"), "w") as f:
        json.dump({"args": vars(args), "losses": LOSSES, "ds_config": ds_config(
            "ce+ntl_was", args.steps, args.micro_batch, args.lr), "runs": runs, "table": table,
            "paired_vs_ce": paired, "wall_s": wall}, f, indent=1)
    with open(os.path.join(args.out_dir, f"{stem}.md"), "w") as f:
        f.write(md + "\n")
    plot(runs, seeds, os.path.join(args.out_dir, f"{stem}.png"))
    print(md)


if __name__ == "__main__":
    main()
