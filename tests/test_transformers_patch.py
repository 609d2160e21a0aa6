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


@pytest.mark.parametrize("fused", [False, True])
def test_install_on_a_plain_model_and_remove(model_and_batch, fused):
    import ntl_deepspeed

    model, ids, labels = model_and_batch
    stock = model(input_ids=ids, labels=labels).loss
    vocab = NumberVocab.from_tokens(TOKENS)
    installed = ntl_deepspeed.install(model, vocab=vocab,
                                      config=NTLConfig(weight=0.3, fused_head=fused))
    ours = model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(ours, reference_loss(model, ids, labels, vocab, "was"),
                               rtol=1e-5, atol=1e-6)
    installed.remove()
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, stock)
    with pytest.raises(ValueError, match="ntl.weight: expected a number"):
        ntl_deepspeed.install(model, vocab=vocab, config=NTLConfig.from_dict({"weight": "0.3"}))
    with pytest.raises(ValueError, match="did you mean 'weight'"):
        patch.apply(vocab, {"wieght": 0.3}, model=model)  # at apply, not at the first forward
    with pytest.raises(TypeError, match="expected an NTLConfig or a dict"):
        patch.apply(vocab, 0.3, model=model)
    patch.apply(vocab, {"weight": 0.3}, model=model)  # a dict of fields is fine
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, ours)
    patch.remove(model)
