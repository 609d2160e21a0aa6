"""A user's own training scripts with NTL added, run under the deepspeed launcher by
tests/test_user_setups.py. Every rank trains a tiny HF Llama (built before DeepSpeed, same seed
on every rank, so its initial weights are known) on identical rows; rank 0 writes the first
step's losses and the reference loss of those weights (the model's own logits +
F.cross_entropy + ntl_loss, one process) to OUT.

    user_setups.py MODE OUT [--autotp]      MODE: loop (ntl_deepspeed.initialize) | trainer
"""
import argparse
import copy
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import deepspeed  # noqa: E402
from dist_utils import end_launched_worker  # noqa: E402

from ntl_deepspeed import NumberVocab, ntl_loss  # noqa: E402
from ntl_deepspeed.integrations.deepspeed import model_layout  # noqa: E402
from ntl_deepspeed.train.device import skip_shm_comm_build  # noqa: E402
from tiny_llama import TOKENS, VOCAB, model_and_batch  # noqa: E402

NTL = {"weight": 0.3, "kind": "was"}


def ds_config(autotp: bool):
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 3}, "steps_per_print": 1000,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
           "ntl": dict(NTL)}
    if autotp:
        cfg["tensor_parallel"] = {"autotp_size": 2, "vocab_parallel_lm_head": True}
    return cfg


def reference(model, ids, labels, vocab):
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, VOCAB), shifted.reshape(-1))
        ntl = ntl_loss(logits, shifted, vocab, "was")
    return {"loss": float(ce + 0.3 * ntl), "ce": float(ce), "ntl": float(ntl)}


def run_loop(model, ids, labels, vocab, autotp):
    import ntl_deepspeed
    from ntl_deepspeed.metrics import NTLMetrics

    metrics = NTLMetrics()
    engine, *_ = ntl_deepspeed.initialize(model=model, config=ds_config(autotp), vocab=vocab,
                                          on_output=metrics)
    loss = engine(input_ids=ids, labels=labels).loss
    engine.backward(loss)
    engine.step()
    dp_group = model_layout(engine.module).dp_group
    row = metrics.reduce(dp_group, loss=loss.detach())
    row["loss"] /= dist.get_world_size(dp_group)
    return {**row, "vocab_parallel": model_layout(engine.module).tp_group is not None}


def run_trainer(model, ids, labels, vocab, autotp, out_dir):
    from transformers import TrainingArguments

    from ntl_deepspeed.integrations.hf_trainer import NTLTrainer

    config = ds_config(autotp)
    config.pop("optimizer")
    config["train_micro_batch_size_per_gpu"] = "auto"
    config["gradient_accumulation_steps"] = "auto"
    rows = [{"input_ids": i, "labels": l} for i, l in zip(ids, labels)] * 4
    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=2, max_steps=2,
                             logging_steps=1, learning_rate=0.1, optim="sgd",
                             lr_scheduler_type="constant", report_to=[], save_strategy="no",
                             deepspeed=config, seed=0, use_cpu=not torch.cuda.is_available())
    trainer = NTLTrainer(model=model, args=args, train_dataset=rows, ntl_vocab=vocab)
    trainer.train()
    row = next(r for r in trainer.state.log_history if "loss" in r)
    return {**row, "vocab_parallel": trainer.ntl_loss.tp_group is not None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["loop", "trainer"])
    ap.add_argument("out")
    ap.add_argument("--autotp", action="store_true")
    ap.add_argument("--local_rank", type=int, default=-1)
    args = ap.parse_args()
    skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend="gloo")
    model, ids, labels = model_and_batch()
    ids, labels = ids[:1].repeat(2, 1), labels[:1].repeat(2, 1)  # identical rows everywhere
    vocab = NumberVocab.from_tokens(TOKENS)
    ref = reference(copy.deepcopy(model), ids, labels, vocab)
    if args.mode == "loop":
        row = run_loop(model, ids, labels, vocab, args.autotp)
    else:
        row = run_trainer(model, ids, labels, vocab, args.autotp, os.path.dirname(args.out))
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"ours": row, "reference": ref}, f)
    end_launched_worker()


if __name__ == "__main__":
    main()
