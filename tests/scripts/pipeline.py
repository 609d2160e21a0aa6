"""DeepSpeed pipeline parallelism (2 stages, CPU, gloo) with NTL, run under the deepspeed
launcher by tests/test_pipeline.py. Every rank builds the same small LM (same seed) as a list of
layers; the reference runs them in one process, unpipelined (logits + F.cross_entropy +
ntl_loss, mean over the micro-batches, autograd). Then PipelineModule(num_stages=2) with
PipelineNTLLoss, one engine.train_batch of SGD (no clipping): each stage's gradient is
(old - new weights) / lr. Rank 0 (stage 0) and rank 1 (last stage) write their parts to OUT.rank.

    pipeline.py OUT
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

from ntl_deepspeed import NTLConfig, NumberVocab, ntl_loss  # noqa: E402
from ntl_deepspeed.train.device import skip_shm_comm_build  # noqa: E402
from ntl_deepspeed.integrations.pipeline import (FusedLMHead, PipelineNTLLoss,  # noqa: E402
                                                 tied_head)
from ntl_deepspeed.metrics import NTLMetrics  # noqa: E402
from tiny_llama import TOKENS, VOCAB  # noqa: E402

HIDDEN, SEQ, MICRO, GAS = 32, 12, 2, 2
LR = 1e3  # gradient = (old - new) / LR: a large step keeps fp32 rounding ~eps of the gradient
# (name, ZeRO stage, head: logits | fused | tied (fused head on the input embedding), NTL)
CASES = [("zero0_logits", 0, "logits", {"normalization": "micro_batch"}),
         ("zero1_fused", 1, "fused", {"normalization": "token"}),
         ("zero1_fused_global_mse", 1, "fused", {"normalization": "global", "kind": "mse"}),
         ("zero0_tied", 0, "tied", {"normalization": "micro_batch"})]
TIED = "tied_modules.embed."  # a TiedLayerSpec's parameters in the PipelineModule


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(HIDDEN)
        self.up, self.down = torch.nn.Linear(HIDDEN, 64), torch.nn.Linear(64, HIDDEN)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


def layers(head: str = "logits"):
    """The model's layers (same seed: same weights). ``fused``: the head as a LayerSpec of
    FusedLMHead; ``tied``: the embedding as a TiedLayerSpec, reused by the head through
    ``tied_head`` (both built by PipelineModule; ``run_case`` copies the weights in)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    torch.manual_seed(0)
    body = [torch.nn.Embedding(VOCAB, HIDDEN), Block(), Block(), torch.nn.LayerNorm(HIDDEN)]
    linear = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    if head == "fused":
        return body + [LayerSpec(FusedLMHead, HIDDEN, VOCAB)]
    if head == "tied":
        embed = TiedLayerSpec("embed", torch.nn.Embedding, VOCAB, HIDDEN)
        return [embed] + body[1:] + [TiedLayerSpec("embed", torch.nn.Embedding, VOCAB, HIDDEN,
                                                   forward_fn=tied_head)]
    return body + [linear]


class Unpipelined(torch.nn.Module):
    """The reference: the same layers in one process; ``tied``: logits on the embedding."""

    def __init__(self, tied: bool):
        super().__init__()
        self.layers = torch.nn.Sequential(*layers()[:4 if tied else 5])
        self.tied = tied

    def forward(self, inputs):
        h = self.layers(inputs)
        return F.linear(h, self.layers[0].weight) if self.tied else h


def micro_batches():
    """GAS micro-batches of (inputs, shifted labels) with digit runs and ignored labels."""
    torch.manual_seed(1)
    out = []
    for i in range(GAS):
        tokens = torch.randint(13, VOCAB, (MICRO, SEQ + 1))
        tokens[:, 3 + i:8 + i] = torch.randint(3, 13, (MICRO, 5))
        labels = tokens[:, 1:].clone()
        labels[0, :2 + i] = -100
        out.append((tokens[:, :-1], labels))
    return out


def reference(ntl, batches, tied):
    """The unpipelined model: loss (mean over micro-batches), metrics, parameter gradients
    by the pipeline's parameter names."""
    model = Unpipelined(tied)
    vocab = NumberVocab.from_tokens(TOKENS)
    kind = ntl.get("kind", "was")
    losses, all_logits, all_labels = [], [], []
    for inputs, labels in batches:
        logits = model(inputs)
        ce = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
        if ntl["normalization"] == "token":
            n = ntl_loss(logits, labels, vocab, kind, reduction="sum") / (labels != -100).sum()
        else:  # micro_batch; global with one DP replica
            n = ntl_loss(logits, labels, vocab, kind)
        losses.append(ce + 0.3 * n)
        all_logits.append(logits.detach())
        all_labels.append(labels)
    loss = torch.stack(losses).mean()
    loss.backward()
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    is_number = (labels >= 3) & (labels < 13)
    z = logits[..., 3:13]
    y_hat = (z.softmax(-1) * torch.arange(10.0)).sum(-1)
    y = (labels - 3).float()
    metrics = {"ce": F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1)).item(),
               "ntl": (ntl_loss(logits, labels, vocab, kind, reduction="sum")
                       / is_number.sum()).item(),
               "number_accuracy": ((z.argmax(-1) == labels - 3) & is_number).sum().item()
               / is_number.sum().item(),
               "number_mae": ((y_hat - y).abs() * is_number).sum().item() / is_number.sum().item()}
    return {"loss": loss.item(), "metrics": metrics,
            "grads": {n.split(".", 1)[1]: p.grad.clone() for n, p in model.named_parameters()}}


class RecordingLoss(PipelineNTLLoss):
    """Records what the last layer handed the loss (logits or the fused head's inputs)."""

    seen = set()

    def __call__(self, outputs, labels):
        self.seen.add(type(outputs).__name__)
        return super().__call__(outputs, labels)


def run_case(name, stage, head, ntl, batches):
    from deepspeed.pipe import PipelineModule

    ref = reference(ntl, batches, head == "tied")
    metrics = NTLMetrics()
    loss_fn = RecordingLoss(NumberVocab.from_tokens(TOKENS),
                            NTLConfig.from_dict({"weight": 0.3, "kind": "was", **ntl}),
                            on_output=metrics)
    module = PipelineModule(layers=layers(head), loss_fn=loss_fn, num_stages=2,
                            partition_method="uniform")
    loss_fn.bind(module)
    reference_weights = dict(torch.nn.Sequential(*layers()).named_parameters())
    with torch.no_grad():  # the layers PipelineModule built: the reference's weights
        for n, p in module.named_parameters():
            if n.startswith(TIED):
                p.copy_(reference_weights["0." + n[len(TIED):]])
            elif head == "fused" and n == "4.weight":
                p.copy_(reference_weights[n])
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS,
              "zero_optimization": {"stage": stage}, "gradient_clipping": 0.0,
              "zero_allow_untested_optimizer": True, "steps_per_print": 1000,
              "optimizer": {"type": "SGD", "params": {"lr": LR}}}
    engine, *_ = deepspeed.initialize(model=module, config=config,
                                      model_parameters=module.parameters())
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    loss = engine.train_batch(iter(batches))
    errors = {}
    for n, p in module.named_parameters():  # pipeline name -> the reference's
        grad = (before[n] - p.detach()) / LR
        want = ref["grads"]["0." + n[len(TIED):] if n.startswith(TIED) else n]
        errors[n] = ((grad - want).abs().max() / want.abs().max()).item()
    row = {"stage": engine.stage_id, "first_layer": module.parts[engine.stage_id],
           "loss": float(loss), "ref_loss": ref["loss"], "grad_rel_err": errors}
    if engine.is_last_stage():
        row["metrics"] = metrics.reduce(loss_fn.dp_group)
        row["ref_metrics"] = ref["metrics"]
        row["loss_inputs"] = sorted(loss_fn.seen)
        loss_fn.seen.clear()
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--local_rank", type=int, default=-1)
    args = ap.parse_args()
    skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend="gloo")
    batches = micro_batches()
    result = {name: run_case(name, stage, head, ntl, copy.deepcopy(batches))
              for name, stage, head, ntl in CASES}
    with open(f"{args.out}.{dist.get_rank()}", "w") as f:
        json.dump(result, f)
    end_launched_worker()


if __name__ == "__main__":
    main()
