"""DeepSpeed's flops profiler counts the fused op's work (it misses custom ops by itself)."""
import os

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from ntl_deepspeed import NTLConfig, NumberVocab  # noqa: E402
from ntl_deepspeed.flops import ce_ntl_forward_flops  # noqa: E402
from ntl_deepspeed.patches.hf_loss import HFLoss  # noqa: E402


def profiled_flops(model, ids):
    from deepspeed.profiling.flops_profiler import FlopsProfiler

    prof = FlopsProfiler(model)
    prof.start_profile()
    model(input_ids=ids, labels=ids).loss.backward()
    flops = prof.get_total_flops()
    prof.end_profile()
    return flops


def test_profile_counts_the_ce_ntl_op():
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens = ["<unk>", "<s>", "</s>"] + [str(d) for d in range(10)] + [f"w{i}" for i in range(51)]
    vocab = NumberVocab.from_tokens(tokens)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2))
    ids = torch.randint(0, 64, (2, 16))
    stock = profiled_flops(model, ids)  # HF's own CE: invisible to the profiler
    model.loss_function = HFLoss(vocab, NTLConfig()).loss_function()
    ours = profiled_flops(model, ids)
    assert ours - stock == ce_ntl_forward_flops(2 * 16, 64, 10)
