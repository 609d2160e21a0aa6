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


def build_model(seed=0, mtp_layers=None):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_layer_local_spec,
                                                          get_gpt_mtp_block_spec)
    from megatron.core.transformer import TransformerConfig

    torch.manual_seed(seed)
    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                            use_cpu_initialization=True, perform_initialization=True,
                            params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
                            mtp_num_layers=mtp_layers)
    spec = get_gpt_layer_local_spec()
    mtp = None if mtp_layers is None else get_gpt_mtp_block_spec(cfg, spec, False)
    return GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=VOCAB,
                    max_sequence_length=16, parallel_output=True, mtp_block_spec=mtp)


def batch(seed=1, b=2, s=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, s), generator=g)
    labels = torch.randint(0, VOCAB, (b, s), generator=g)
    digits = torch.rand(b, s, generator=g) < 0.5
    labels[digits] = torch.randint(4, 14, (int(digits.sum()),), generator=g)
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), 1).view(1, 1, s, s)
    return ids, pos, causal, labels


def worker(rank, world, kind):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    import ntl_deepspeed.patches.megatron_core as patch

    cpu_shims()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    try:
        vocab = NumberVocab.from_tokens(TOKENS)
        cfg = NTLConfig(kind=kind, weight=0.3)
        ids, pos, causal, labels = batch()

        # reference: unpatched model -> gathered full logits -> F.cross_entropy + 0.3 * ntl_loss
        model = build_model()
        local = model(ids, pos, causal)  # [b, s, V/tp]
        full = gather_from_tensor_model_parallel_region(local)
        ce = F.cross_entropy(full.reshape(-1, VOCAB), labels.reshape(-1), reduction="none")
        ref = ce.view(labels.shape) + 0.3 * ntl_loss(full, labels, vocab, kind, reduction="none")
        ref.sum().backward()
        ref_grad = model.output_layer.weight.grad.clone()

        patch.apply(vocab, cfg)
        patch.apply(vocab, cfg)  # twice: a no-op
        from megatron.core.models.common.language_module.language_module import LanguageModule

        assert LanguageModule.compute_language_model_loss.__wrapped__.__name__ == \
            "compute_language_model_loss"
        model = build_model()
        loss = model(ids, pos, causal, labels=labels)  # [b, s] per-token loss
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-5)
        loss.sum().backward()
        torch.testing.assert_close(model.output_layer.weight.grad, ref_grad, rtol=1e-4,
                                   atol=1e-6)
        entry = patch.report_entry(torch.ones_like(labels, dtype=torch.float32))
        number_labels = (labels >= 4) & (labels < 14)
        assert entry[1].item() == number_labels.sum().item()

        patch.remove()
        assert not patch.is_applied()
        model = build_model()
        plain = model(ids, pos, causal, labels=labels)
        torch.testing.assert_close(plain, ce.view(labels.shape).detach(), rtol=1e-5, atol=1e-5)
    finally:
        patch.remove()
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("kind", ["was", "mse"])
def test_patched_gpt_model_tp2_equals_reference(kind):
    run_distributed(worker, 2, kind, timeout=400)


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
        patch.apply(vocab, NTLConfig(kind="was", weight=0.3))
        loss = model(ids, pos, causal, labels=labels)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
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
