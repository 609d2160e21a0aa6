"""Two-rank demo of the vocab-parallel CE+NTL op: a vocab-sharded LM head learns number text.

    torchrun --nproc_per_node 2 launch/op_demo.py [--steps 30] [--tokenizer PATH]

Each rank holds half of the head's rows (its vocab slice); the loss needs two all-reduces per
step and the backward none. At step 0 rank 0 checks the sharded loss against the unsharded one.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import os
import random

import torch
import torch.distributed as dist

from ntl_deepspeed import NTLConfig, NumberVocab, ce_ntl, ntl_loss
from ntl_deepspeed.train.device import accelerator, backend
from ntl_deepspeed.numbers import partition_bounds


def default_tokenizer() -> str:
    import mistral_common

    return glob.glob(os.path.join(os.path.dirname(mistral_common.__file__), "data",
                                  "tokenizer.model.v1"))[0]


def corpus(n: int, seed: int = 0):
    rng = random.Random(seed)
    return [f"{a} plus {b} is {a + b}." if rng.random() < 0.5 else
            f"The shop sold {a} apples and {b} pears." for a, b in
            ((rng.randint(0, 999), rng.randint(0, 999)) for _ in range(n))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--hidden", type=int, default=64)
    args = ap.parse_args()
    dist.init_process_group(backend(), timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) \
        if accelerator() == "cuda" else torch.device("cpu")
    torch.manual_seed(0)

    import sentencepiece as spm

    path = args.tokenizer or default_tokenizer()
    sp = spm.SentencePieceProcessor(model_file=path)
    vocab = NumberVocab.from_tokenizer(path, mode="digits")
    ids = torch.tensor([t for s in corpus(64) for t in sp.encode(s)][:2049], device=dev)
    inputs, labels = ids[:-1], ids[1:]
    start, end = partition_bounds(vocab.vocab_size, world)[rank]

    embed = torch.nn.Embedding(vocab.vocab_size, args.hidden).to(dev)  # replicated (same seed)
    head = torch.nn.Parameter((torch.randn(vocab.vocab_size, args.hidden)[start:end] * 0.02)
                              .to(dev))
    params = list(embed.parameters()) + [head]
    opt = torch.optim.SGD(params, lr=2.0)
    cfg = NTLConfig(kind="was", weight=0.3)
    shard = vocab.shard_for(end - start, dist.group.WORLD, start, dev)  # built once, used every step
    for step in range(args.steps):
        hidden = embed(inputs)
        logits_shard = hidden @ head.t()  # [T, V/world]
        out = ce_ntl(labels, shard, cfg, logits=logits_shard)
        opt.zero_grad()
        out.loss.backward()
        for p in embed.parameters():  # the replicated embedding sees every rank's partial grad
            dist.all_reduce(p.grad)
        if step == 0:
            sizes = [e - s for s, e in partition_bounds(vocab.vocab_size, world)]
            gathered = [torch.empty(logits_shard.shape[0], n, device=dev) for n in sizes]
            dist.all_gather(gathered, logits_shard.detach().contiguous())
            if rank == 0:
                whole = torch.cat(gathered, -1)
                ref = torch.nn.functional.cross_entropy(whole, labels) + 0.3 * ntl_loss(
                    whole, labels, vocab, "was")
                print(f"step 0: sharded loss {out.loss.item():.6f} vs unsharded "
                      f"{ref.item():.6f} (|diff| {abs(out.loss.item() - ref.item()):.1e})")
        opt.step()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            acc = out.number_correct.sum() / out.number_label_mask.sum()
            print(f"step {step:3d}  ce {out.ce.item():.3f}  ntl {out.ntl.item():.3f}  "
                  f"number-token accuracy {acc.item():.2f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
