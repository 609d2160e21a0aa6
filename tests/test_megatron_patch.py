"""The Megatron-core patch on a real TP=2 GPTModel (megatron-core 0.16.1, CPU, gloo)."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed
from ntl_deepspeed import NTLConfig, NumberVocab, ntl_loss

VOCAB = 64
TOKENS = ["<unk>", "<s>", "</s>", "."] + [str(d) for d in range(10)] + \
         [f"w{i}" for i in range(VOCAB - 14)]


def cpu_shims():
    """Test-only: megatron-core's GPTModel asks CUDA for a device and an RNG tracker."""
    torch.cuda.current_device = lambda: "cpu"
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()


def torch_norm_with_sequence_parallel():
    """Test-only: megatron-core's torch-LayerNorm wrapper refuses sequence parallelism (TE/Apex
    norms mark their weights for the gradient all-reduce); a plain LayerNorm lets the sequence-
    parallel path run on CPU. Per-rank gradients of replicated weights are then partial sums,
    the same in the reference and in the patched model, and compared as such."""
    from megatron.core.transformer import torch_norm

    torch_norm.WrappedTorchNorm.__new__ = \
        lambda cls, config, hidden_size, eps=1e-5, **kw: torch.nn.LayerNorm(hidden_size, eps=eps)


def build_model(seed=0, mtp_layers=None, share=False, sequence_parallel=False):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_layer_local_spec,
                                                          get_gpt_mtp_block_spec)
    from megatron.core.transformer import TransformerConfig

    torch.manual_seed(seed)
    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                            use_cpu_initialization=True, perform_initialization=True,
                            params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
                            mtp_num_layers=mtp_layers, sequence_parallel=sequence_parallel,
                            tensor_model_parallel_size=torch.distributed.get_world_size())
    spec = get_gpt_layer_local_spec()
    mtp = None if mtp_layers is None else get_gpt_mtp_block_spec(cfg, spec, False)
    return GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=VOCAB,
                    max_sequence_length=16, parallel_output=True, mtp_block_spec=mtp,
                    share_embeddings_and_output_weights=share)


def batch(seed=1, b=2, s=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, s), generator=g)
    labels = torch.randint(0, VOCAB, (b, s), generator=g)
    digits = torch.rand(b, s, generator=g) < 0.5
    labels[digits] = torch.randint(4, 14, (int(digits.sum()),), generator=g)
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), 1).view(1, 1, s, s)
    return ids, pos, causal, labels


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def worker(rank, world, kind, share, sp):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    import ntl_deepspeed.patches.megatron_core as patch

    cpu_shims()
    if sp:
        torch_norm_with_sequence_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    try:
        vocab = NumberVocab.from_tokens(TOKENS)
        cfg = NTLConfig(kind=kind, weight=0.3)
        ids, pos, causal, labels = batch()

        # reference: unpatched model -> gathered full logits -> F.cross_entropy + 0.3 * ntl_loss
        model = build_model(share=share, sequence_parallel=sp)
        local = model(ids, pos, causal)  # [b, s, V/tp]
        full = gather_from_tensor_model_parallel_region(local)
        ce = F.cross_entropy(full.reshape(-1, VOCAB), labels.reshape(-1), reduction="none")
        ref = ce.view(labels.shape) + 0.3 * ntl_loss(full, labels, vocab, kind, reduction="none")
        ref.sum().backward()
        ref_grads = grads(model)

        fused_calls = []
        real_fused = patch.fused_linear_ce_ntl
        patch.fused_linear_ce_ntl = lambda *a, **k: fused_calls.append(1) or real_fused(*a, **k)
        for fused in (False, True):  # materialised logits, then the fused output layer
            patch.apply(vocab, cfg, fused_head=fused, block_size=5, token_chunk=7)
            patch.apply(vocab, cfg, fused_head=fused, block_size=5, token_chunk=7)  # no-op
            from megatron.core.models.common.language_module.language_module import \
                LanguageModule

            assert LanguageModule.compute_language_model_loss.__wrapped__.__name__ == \
                "compute_language_model_loss"
            model = build_model(share=share, sequence_parallel=sp)
            loss = model(ids, pos, causal, labels=labels)  # [b, s] per-token loss
            torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-5)
            loss.sum().backward()
            got = grads(model)
            assert got.keys() == ref_grads.keys()
            for name, g in ref_grads.items():  # every parameter: the TP hidden-grad reduction
                torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)
            entry = patch.report_entry(torch.ones_like(labels, dtype=torch.float32))
            number_labels = (labels >= 4) & (labels < 14)
            assert entry[1].item() == number_labels.sum().item()
            logits = model(ids, pos, causal)  # no labels: the output layer gives logits
            assert logits.shape == (*labels.shape, VOCAB // world)
            assert len(fused_calls) == int(fused), fused_calls
        patch.fused_linear_ce_ntl = real_fused

        patch.remove()
        assert not patch.is_applied()
        from megatron.core.models.gpt.gpt_model import GPTModel

        assert not hasattr(GPTModel._postprocess, "__wrapped__")
        model = build_model(share=share, sequence_parallel=sp)
        plain = model(ids, pos, causal, labels=labels)
        torch.testing.assert_close(plain, ce.view(labels.shape).detach(), rtol=1e-5, atol=1e-5)
    finally:
        patch.remove()
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("kind,share,sequence_parallel", [
    ("was", False, False), ("mse", True, False), ("was", False, True)])
def test_patched_gpt_model_tp2_equals_reference(kind, share, sequence_parallel):
    run_distributed(worker, 2, kind, share, sequence_parallel, timeout=400)


def worker_mtp(rank, world):
    """With Multi-Token Prediction the main head must still get CE + NTL (MTP heads: CE)."""
    from megatron.core import parallel_state

    import ntl_deepspeed.patches.megatron_core as patch

    cpu_shims()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    try:
        vocab = NumberVocab.from_tokens(TOKENS)
        ids, pos, causal, labels = batch()
        model = build_model(mtp_layers=1)
        head_outputs = []  # MTP calls the output layer first, the main head last; copies, as
        model.output_layer.register_forward_hook(  # Megatron's CE overwrites the logits
            lambda m, i, o: head_outputs.append(o[0].detach().clone()))
        plain_ce = model(ids, pos, causal, labels=labels).detach()  # Megatron's own CE
        main_logits = head_outputs[-1].transpose(0, 1)                # [b, s, V]
        torch.testing.assert_close(plain_ce, F.cross_entropy(
            main_logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none").view(
                labels.shape), rtol=1e-5, atol=1e-5)
        ref = plain_ce + 0.3 * ntl_loss(main_logits, labels, vocab, "was", reduction="none")
        for fused in (False, True):  # fused: the main head only, MTP heads keep their logits
            patch.apply(vocab, NTLConfig(kind="was", weight=0.3), fused_head=fused)
            head_outputs.clear()
            loss = model(ids, pos, causal, labels=labels)
            torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
            assert head_outputs[-1].shape == ((12, 2) if fused else (12, 2, VOCAB))
    finally:
        patch.remove()
        parallel_state.destroy_model_parallel()


def test_main_head_gets_ntl_with_multi_token_prediction():
    run_distributed(worker_mtp, 1, timeout=300)


def test_missing_symbol_is_named(monkeypatch):
    import ntl_deepspeed.patches.megatron_core as patch
    from megatron.core.models.common.language_module import language_module

    monkeypatch.delattr(language_module.LanguageModule, "compute_language_model_loss")
    with pytest.raises(AttributeError, match="LanguageModule.compute_language_model_loss"):
        patch.apply(NumberVocab.from_tokens(TOKENS))


def test_megatron_lm_arguments_configure_the_patch(mistral_model_path):
    import argparse

    import ntl_deepspeed.patches.megatron_core as patch

    parser = patch.add_ntl_args(argparse.ArgumentParser())
    args = parser.parse_args(["--ntl-tokenizer", mistral_model_path, "--ntl-kind", "mse",
                              "--ntl-weight", "0.5", "--ntl-fused-head",
                              "--ntl-fused-block-size", "256", "--ntl-fused-token-chunk", "512"])
    args.padded_vocab_size = 32768
    try:
        vocab = patch.apply_from_args(args)
        assert (vocab.vocab_size, vocab.number_ids.numel()) == (32768, 10)
        state = patch._state
        assert (state.config.kind, state.config.weight, state.fused_head, state.block_size,
                state.token_chunk) == ("mse", 0.5, True, 256, 512)
        assert patch.is_applied()
    finally:
        patch.remove()
