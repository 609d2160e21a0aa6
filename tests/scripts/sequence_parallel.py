"""DeepSpeed Ulysses sequence parallelism (SP 2) with NTL, run under the deepspeed launcher by
tests/test_sequence_parallel.py. Every rank builds the same tiny HF Llama (same seed) and the
same batch; first, in one process and before Ulysses replaces the attention, the reference:
the model's own logits on the whole sequences + F.cross_entropy + ntl_loss, and the gradient of
every parameter. Then SP 2 (each rank a slice of the sequences from UlyssesSPDataLoaderAdapter)
for each case; rank 0 writes both to OUT.

    sequence_parallel.py loop OUT      ntl_deepspeed.initialize(..., mpu=mpu), several cases
                                       (4 ranks: SP 2 x DP 2, each data replica its own rows)
    sequence_parallel.py trainer OUT   NTLTrainer + ParallelismConfig(sp_backend="deepspeed")
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
from ntl_deepspeed.train.device import skip_shm_comm_build  # noqa: E402
from tiny_llama import TOKENS, VOCAB, model_and_batch  # noqa: E402

SP, SEQ, MICRO = 2, 12, 2
# (name, ZeRO stage, NTL section): every normalisation, ZeRO 1/2/3, materialised and fused
LOOP_CASES = [("zero1", 1, {"normalization": "micro_batch"}),
              ("zero2_global", 2, {"normalization": "global"}),
              ("zero3", 3, {"normalization": "micro_batch"}),
              ("zero3_fused_token", 3, {"normalization": "token", "fused_head": True}),
              ("zero1_fused", 1, {"normalization": "micro_batch", "fused_head": True,
                                  "kind": "mse"})]


# 4 ranks: SP 2 x DP 2 (two data replicas, each its own micro-batch)
DP_CASES = [("dp2_zero1_global", 1, {"normalization": "global"}),
            ("dp2_zero3_global", 3, {"normalization": "global"}),
            ("dp2_zero2", 2, {"normalization": "micro_batch"})]
DIGITS = (3, 13)  # ids of "0".."9" in TOKENS


def batch(replica: int = 0):
    """Uneven work across the two slices: number labels mostly in the second one, ignored
    labels only in the first. Each data replica its own rows."""
    _, ids, labels = model_and_batch()
    torch.manual_seed(100 + replica)
    ids[:, 2:9] = torch.randint(13, VOCAB, (2, 7))
    ids[:, 7:11 - replica] = torch.randint(3, 13, (2, 4 - replica))  # labels at 6..9 (slice 1)
    ids[0, 3] = 7                                  # one digit label in slice 0
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, :4] = -100  # slice 0 holds 7 labelled positions, slice 1 holds 10
    return ids, labels


def reference(model, replicas, vocab, ntl, mine: int = 0):
    """Loss parts of data replica ``mine`` and the parameter gradients of the unsplit model (one
    process, no DeepSpeed): each replica's micro-batch loss per ``normalization``, gradients
    averaged over the replicas as DeepSpeed does; ``ce_all``/``ntl_all``: per valid token / per
    number label over all replicas (the metrics)."""
    model = copy.deepcopy(model)
    kind, norm, parts = ntl.get("kind", "was"), ntl.get("normalization"), []
    for ids, labels in replicas:
        logits = model(input_ids=ids, position_ids=torch.arange(SEQ).expand_as(ids)).logits
        shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
        parts.append((logits, shifted))
    numbers = [((y >= DIGITS[0]) & (y < DIGITS[1])).sum() for _, y in parts]
    rows, ce_sum, ntl_sum = [], 0.0, 0.0
    for logits, shifted in parts:
        ce = F.cross_entropy(logits.reshape(-1, VOCAB), shifted.reshape(-1))
        total = ntl_loss(logits, shifted, vocab, kind, reduction="sum")
        if norm == "token":
            n = total / (shifted != -100).sum()
        elif norm == "global":  # x replicas: DeepSpeed averages over them
            n = total * len(replicas) / sum(numbers)
        else:
            n = ntl_loss(logits, shifted, vocab, kind)
        rows.append((ce + 0.3 * n, ce, n))
        ce_sum, ntl_sum = ce_sum + ce.item() * (shifted != -100).sum().item(), \
            ntl_sum + total.item()
    torch.stack([r[0] for r in rows]).mean().backward()
    loss, ce, n = rows[mine]
    valid = sum((y != -100).sum().item() for _, y in parts)
    return {"loss": loss.item(), "ce": ce.item(), "ntl": n.item(), "ce_all": ce_sum / valid,
            "ntl_all": ntl_sum / sum(numbers).item(),
            "grads": {k: p.grad.clone() for k, p in model.named_parameters()}}


def sp_batches(ids, labels, sp_group):
    """This rank's slice, as DeepSpeed's adapter hands it (pre-shifted ``shift_labels``)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

    rows = {"input_ids": ids, "labels": labels,
            "position_ids": torch.arange(SEQ).expand_as(ids).clone()}
    loader = torch.utils.data.DataLoader([rows], batch_size=None)
    return next(iter(UlyssesSPDataLoaderAdapter(loader, dist.get_rank(sp_group), sp_group,
                                                dist.get_world_size(sp_group), "cpu")))


def compare(engine, ref, row):
    from deepspeed.utils import safe_get_full_grad

    errors = {}
    for name, p in engine.module.named_parameters():
        grad = safe_get_full_grad(p)
        errors[name] = ((grad - ref["grads"][name]).abs().max()
                        / ref["grads"][name].abs().max().clamp_min(1e-12)).item()
    out = {k: ref[k] for k in ("loss", "ce", "ntl", "ce_all", "ntl_all")}
    return {"ours": row, "reference": out, "grad_rel_err": errors}


def ds_config(stage, ntl):
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
            "sequence_parallel_size": SP, "zero_optimization": {"stage": stage},
            "gradient_clipping": 0.0, "steps_per_print": 1000,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
            "ntl": {"weight": 0.3, "kind": "was", **ntl}}


def run_loop(model, vocab):
    import ntl_deepspeed
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    from ntl_deepspeed.metrics import NTLMetrics

    n_replicas, replica = dist.get_world_size() // SP, dist.get_rank() // SP
    cases = LOOP_CASES if n_replicas == 1 else DP_CASES
    replicas = [batch(r) for r in range(n_replicas)]
    refs = {name: reference(model, replicas, vocab, ntl, replica) for name, _, ntl in cases}
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation="sdpa", sequence_parallel_size=SP,
        micro_batch_size=MICRO, seq_length=SEQ, seq_length_is_variable=False)
    mine = sp_batches(*replicas[replica], mpu.get_sequence_parallel_group())
    results = {}
    for name, stage, ntl in cases:
        metrics = NTLMetrics()
        engine, *_ = ntl_deepspeed.initialize(model=copy.deepcopy(model),
                                              config=ds_config(stage, ntl), vocab=vocab,
                                              mpu=mpu, on_output=metrics)
        out = engine(input_ids=mine["input_ids"], position_ids=mine["position_ids"],
                     labels=mine["shift_labels"], shift_labels=mine["shift_labels"])
        engine.backward(out.loss)
        row = {"loss": out.loss.item(), "logits_materialised": out.logits is not None,
               "slice_tokens": int(mine["input_ids"].shape[1]),
               **metrics.reduce(mpu.get_sequence_data_parallel_group())}
        results[name] = compare(engine, refs[name], row)
    everyone = [None] * dist.get_world_size()  # each data replica reports its own loss
    dist.all_gather_object(everyone, results)
    return {name: {**results[name], "per_rank_loss": [r[name]["ours"]["loss"] for r in everyone],
                   "per_rank_ref": [r[name]["reference"]["loss"] for r in everyone]}
            for name in results}


def run_trainer(model, ids, labels, vocab, out_dir, plain: bool = False):
    """NTLTrainer, or (``plain``) the stock ``Trainer`` with ``install`` at train begin."""
    from accelerate.utils import DeepSpeedSequenceParallelConfig, ParallelismConfig
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from ntl_deepspeed import NTLConfig, install
    from ntl_deepspeed.integrations.hf_trainer import NTLTrainer

    ntl = {"normalization": "micro_batch"}
    ref = reference(model, [(ids, labels)], vocab, ntl)
    config = ds_config(3, ntl)
    config.pop("optimizer")
    config.update(train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto",
                  gradient_clipping="auto")
    grads = {}

    class GradsBeforeStep(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if not grads:
                grads.update(compare(trainer.model_wrapped, ref, {}))

    position_ids = torch.arange(SEQ)
    rows = [{"input_ids": i, "labels": l, "position_ids": position_ids}
            for i, l in zip(ids, labels)]
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=MICRO, max_steps=1, logging_steps=1,
        learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
        report_to=[], save_strategy="no", deepspeed=config, seed=0, use_cpu=True,
        parallelism_config=ParallelismConfig(
            sp_backend="deepspeed", sp_size=SP, sp_handler=DeepSpeedSequenceParallelConfig(
                sp_seq_length=SEQ, sp_seq_length_is_variable=False,
                sp_attn_implementation="sdpa")))
    if plain:
        class InstallAtTrainBegin(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                install(trainer.model_wrapped, config=NTLConfig(**ntl), vocab=vocab)

        trainer = Trainer(model=model, args=args, train_dataset=rows,
                          callbacks=[InstallAtTrainBegin(), GradsBeforeStep()])
    else:
        trainer = NTLTrainer(model=model, args=args, train_dataset=rows, ntl_vocab=vocab,
                             callbacks=[GradsBeforeStep()])
    trainer.train()
    row = next(r for r in trainer.state.log_history if "loss" in r)
    return {"trainer": {**grads, "ours": row}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["loop", "trainer", "plain_trainer"])
    ap.add_argument("out")
    ap.add_argument("--local_rank", type=int, default=-1)
    args = ap.parse_args()
    skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend="gloo")
    model, _, _ = model_and_batch()
    vocab = NumberVocab.from_tokens(TOKENS)
    if args.mode == "loop":
        result = run_loop(model, vocab)
    else:
        result = run_trainer(model, *batch(), vocab, os.path.dirname(args.out),
                             plain=args.mode == "plain_trainer")
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)
    end_launched_worker()


if __name__ == "__main__":
    main()
