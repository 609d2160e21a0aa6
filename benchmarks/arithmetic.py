"""Does NTL help? CE vs CE + 0.3 NTL-MSE vs CE + 0.3 NTL-WAS on 2-digit x 2-digit multiplication.

A character-level decoder (4 layers, d=128, 4 heads) learns ``ab*cd=efgh`` (answers zero-padded
to 4 digits, loss on the 4 answer tokens) for a FIXED number of steps. Seeds are paired: for a
given seed the three losses start from the same weights and see the same batches. All losses come
from the project's op (``ce_ntl``; CE alone = NTL disabled). Evaluation: greedy
decoding on 2000 held-out problems never trained on; MAE of the parsed answer (primary),
per-digit accuracy, exact match; per-seed paired differences against CE with a 95 % t-interval.
Writes benchmarks/results/arithmetic.{json,md,png}.

    python benchmarks/arithmetic.py [--seeds 5] [--steps 1000] [--workers 2] [--quick]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._stats import t_interval  # noqa: E402
from ntl_deepspeed import NTLConfig, NumberVocab, ce_ntl  # noqa: E402

CHARS = ["<pad>", "<bos>"] + [str(d) for d in range(10)] + ["*", "="]
STOI = {c: i for i, c in enumerate(CHARS)}
PROMPT, ANSWER = 6, 4  # "ab*cd=" and "efgh"
LOSSES = {"ce": NTLConfig(enabled=False), "ce+ntl_mse": NTLConfig(kind="mse", weight=0.3),
          "ce+ntl_was": NTLConfig(kind="was", weight=0.3)}


def split_problems(n_test: int, seed: int = 12345):
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    return pairs[n_test:], pairs[:n_test]  # train, held-out test


def encode(pairs):
    rows = [[STOI["<bos>"]] + [STOI[c] for c in f"{a}*{b}={a * b:04d}"] for a, b in pairs]
    return torch.tensor(rows)  # [N, 1 + 6 + 4]


class Decoder(nn.Module):
    def __init__(self, d=128, layers=4, heads=4, length=PROMPT + ANSWER + 1):
        super().__init__()
        self.tok = nn.Embedding(len(CHARS), d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, len(CHARS), bias=False)

    def forward(self, x):
        n = x.shape[1]
        mask = torch.triu(torch.full((n, n), float("-inf")), 1)
        return self.head(self.norm(self.body(self.tok(x) + self.pos[:n], mask=mask,
                                             is_causal=True)))


def lr_at(step, steps, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@torch.no_grad()
def evaluate(model, test_pairs):
    model.eval()
    x = encode(test_pairs)[:, : 1 + PROMPT]
    for _ in range(ANSWER):  # greedy decoding
        nxt = model(x)[:, -1, 2:12].argmax(-1) + 2  # digits only: the answer format is fixed
        x = torch.cat([x, nxt.unsqueeze(1)], 1)
    pred_digits = x[:, 1 + PROMPT:] - 2
    true = torch.tensor([a * b for a, b in test_pairs])
    pred = sum(pred_digits[:, i] * 10 ** (ANSWER - 1 - i) for i in range(ANSWER))
    true_digits = torch.stack([(true // 10 ** (ANSWER - 1 - i)) % 10 for i in range(ANSWER)], 1)
    model.train()
    return {"mae": (pred - true).abs().float().mean().item(),
            "digit_accuracy": (pred_digits == true_digits).float().mean().item(),
            "exact_match": (pred == true).float().mean().item()}


def train_one(job):
    loss_name, seed, steps, batch, n_test, eval_every = job
    torch.set_num_threads(1)
    train_pairs, test_pairs = split_problems(n_test)
    vocab = NumberVocab.from_tokens(CHARS, mode="digits")
    torch.manual_seed(seed)
    model = Decoder()  # same init for every loss at this seed
    data_rng = torch.Generator().manual_seed(seed)  # same batches for every loss at this seed
    train = encode(train_pairs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    cfg = LOSSES[loss_name]
    curve, step_times, loss_times = [], [], []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, 1e-3, 100)
        rows = train[torch.randint(0, train.shape[0], (batch,), generator=data_rng)]
        t0 = time.perf_counter()
        logits = model(rows[:, :-1])
        labels = rows[:, 1:].clone()
        labels[:, : PROMPT] = -100  # loss on the 4 answer tokens only
        t1 = time.perf_counter()
        out = ce_ntl(labels, vocab, cfg, logits=logits)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        step_times.append(time.perf_counter() - t0)
        loss_times.append(t2 - t1)
        if step % eval_every == 0 or step == steps - 1:
            curve.append({"step": step, "ce": out.ce.item(),
                          "ntl_mse_of_yhat": ((out.predicted_value - out.label_value) ** 2 *
                                              out.number_token_label).sum().item()
                          / max(1, out.number_token_label.sum().item())})
    final = evaluate(model, test_pairs)
    return {"loss": loss_name, "seed": seed, "steps": steps, **final, "curve": curve,
            "median_step_s": statistics.median(step_times),
            "median_loss_fn_s": statistics.median(loss_times)}


def summarize(runs, seeds):
    table, paired = {}, {}
    for name in LOSSES:
        rs = [r for r in runs if r["loss"] == name]
        table[name] = {m: (statistics.fmean(r[m] for r in rs),
                           statistics.stdev(r[m] for r in rs) if len(rs) > 1 else 0.0)
                       for m in ("mae", "digit_accuracy", "exact_match", "median_step_s")}
    base = {r["seed"]: r for r in runs if r["loss"] == "ce"}
    for name in LOSSES:
        if name == "ce":
            continue
        rs = {r["seed"]: r for r in runs if r["loss"] == name}
        paired[name] = {m: t_interval([rs[s][m] - base[s][m] for s in seeds])
                        for m in ("mae", "digit_accuracy", "exact_match")}
    return table, paired


def markdown(table, paired, args):
    lines = [f"2-digit x 2-digit multiplication, {args.steps} steps, batch {args.batch}, "
             f"{args.seeds} paired seeds, {args.n_test} held-out problems (greedy decoding).", "",
             "| loss | MAE ↓ | digit accuracy | exact match | step time |", "|---|---|---|---|---|"]
    for name, t in table.items():
        lines.append(f"| {name} | {t['mae'][0]:.2f} ± {t['mae'][1]:.2f} | "
                     f"{t['digit_accuracy'][0]:.3f} ± {t['digit_accuracy'][1]:.3f} | "
                     f"{t['exact_match'][0]:.3f} ± {t['exact_match'][1]:.3f} | "
                     f"{t['median_step_s'][0] * 1e3:.1f} ms |")
    lines += ["", "Paired differences vs CE (mean [95 % t-interval]); negative MAE = better:", "",
              "| loss | Δ MAE | Δ digit accuracy | Δ exact match |", "|---|---|---|---|"]
    for name, p in paired.items():
        lines.append(f"| {name} | " + " | ".join(f"{p[m][0]:+.3f} [{p[m][1]:+.3f}, {p[m][2]:+.3f}]"
                                                 for m in ("mae", "digit_accuracy", "exact_match"))
                     + " |")
    return "\n".join(lines)


def plot(runs, seeds, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    colors = dict(zip(LOSSES, ["tab:blue", "tab:orange", "tab:green"]))
    for r in runs:
        a.plot([c["step"] for c in r["curve"]], [c["ce"] for c in r["curve"]],
               color=colors[r["loss"]], alpha=0.6, label=r["loss"] if r["seed"] == seeds[0]
               else None)
    a.set_yscale("log")
    a.set(title="training CE on answer tokens", xlabel="step")
    a.legend()
    for i, name in enumerate(LOSSES):
        maes = [next(r["mae"] for r in runs if r["loss"] == name and r["seed"] == s)
                for s in seeds]
        b.scatter([i] * len(maes), maes, color=colors[name])
        for s, m in zip(seeds, maes):
            b.annotate(str(s), (i, m), fontsize=7, xytext=(4, 0), textcoords="offset points")
    b.set_xticks(range(len(LOSSES)), list(LOSSES))
    b.set(title="held-out MAE per seed", ylabel="MAE")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1 seed, 30 steps (smoke run)")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.steps, args.n_test = 1, 20, 100
    seeds = list(range(args.seeds))
    jobs = [(name, s, args.steps, args.batch, args.n_test, max(1, args.steps // 40))
            for s in seeds for name in LOSSES]
    t0 = time.time()
    if args.workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.workers) as pool:
            runs = []
            for r in pool.imap_unordered(train_one, jobs):
                runs.append(r)
                print(f"{r['loss']:>11} seed {r['seed']}: MAE {r['mae']:.2f} digits "
                      f"{r['digit_accuracy']:.3f} exact {r['exact_match']:.3f}", flush=True)
    else:
        runs = [train_one(j) for j in jobs]
    table, paired = summarize(runs, seeds)
    md = markdown(table, paired, args)
    overhead = {name: table[name]["median_step_s"][0] / table["ce"]["median_step_s"][0]
                for name in LOSSES}
    os.makedirs(args.out_dir, exist_ok=True)
    stem = "arithmetic_quick" if args.quick else "arithmetic"
    with open(os.path.join(args.out_dir, f"{stem}.json"), "w") as f:
        json.dump({"args": vars(args), "runs": runs, "table": table, "paired_vs_ce": paired,
                   "step_time_ratio_vs_ce": overhead, "wall_s": time.time() - t0}, f, indent=1)
    with open(os.path.join(args.out_dir, f"{stem}.md"), "w") as f:
        f.write(md + "\n\nStep time vs CE (median, same runs): " + ", ".join(
            f"{k} {v:.3f}x" for k, v in overhead.items()) + "\n")
    plot(runs, seeds, os.path.join(args.out_dir, f"{stem}.png"))
    print(md)
    print("step time vs CE:", overhead)


if __name__ == "__main__":
    main()
