"""The transformers patch: a Llama model's loss becomes CE + lambda*NTL (shifted labels)."""
import pytest
import torch
import torch.nn.functional as F

from ntl_deepspeed import NTLConfig, NumberVocab, ntl_loss
import ntl_deepspeed.patches.transformers as patch

TOKENS = ["<unk>", "<s>", "</s>"] + [str(d) for d in range(10)] + [f"w{i}" for i in range(51)]


@pytest.fixture
def model_and_batch():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2))
    ids = torch.randint(0, 64, (2, 12))
    ids[:, 5:9] = torch.randint(3, 13, (2, 4))
    labels = ids.clone()
    labels[0, :3] = -100
    return model, ids, labels


def reference(model, ids, labels, vocab, kind):
    logits = model(input_ids=ids).logits
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, 64), shifted.reshape(-1))
    return ce + 0.3 * ntl_loss(logits, shifted, vocab, kind)


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
        ref = reference(model, ids, labels, vocab, "was")
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
