"""The transformers patch: a Llama model's loss becomes CE + lambda*NTL (shifted labels)."""
import pytest
import torch

import tiny_llama
from ntl_deepspeed import NTLConfig, NumberVocab
import ntl_deepspeed.patches.transformers as patch
from tiny_llama import TOKENS, reference_loss


@pytest.fixture
def model_and_batch():
    return tiny_llama.model_and_batch()


@pytest.mark.parametrize("per_model", [False, True])
def test_patch_gives_ce_plus_ntl_and_is_reversible(model_and_batch, per_model):
    model, ids, labels = model_and_batch
    vocab = NumberVocab.from_tokens(TOKENS)
    stock = model(input_ids=ids, labels=labels).loss
    target = model if per_model else None
    try:
        patch.apply(vocab, NTLConfig(kind="mse", weight=0.3), model=target)
        patch.apply(vocab, NTLConfig(kind="was", weight=0.3), model=target)  # re-apply: update
        assert patch.is_applied(target)
        ours = model(input_ids=ids, labels=labels).loss
        ref = reference_loss(model, ids, labels, vocab, "was")
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        ours.backward()
        g_ours = model.lm_head.weight.grad.clone()
        model.zero_grad()
        ref.backward()
        torch.testing.assert_close(g_ours, model.lm_head.weight.grad, rtol=1e-5, atol=1e-7)
    finally:
        patch.remove(target)
    assert not patch.is_applied(target)
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, stock)
