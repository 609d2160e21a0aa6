"""The fused head on a Hugging Face Llama: same loss and parameter gradients as the model's
logits + F.cross_entropy + ntl_loss (the independent reference), and a clean install/remove."""
import pytest
import torch
import torch.nn.functional as F

from ntl_deepspeed import NTLConfig, NumberVocab, ntl_loss
from ntl_deepspeed.patches import fused_head
from ntl_deepspeed.patches.hf_loss import HFLoss
from tiny_llama import TOKENS, model_and_batch, reference_loss


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind,bias,tied,block,chunk", [
    ("was", False, False, 7, 5), ("mse", True, False, 64, 2048),
    ("number_level", False, False, 1000, 9),
    ("was", False, True, 16, 11)])  # head tied to the embedding: both gradients meet
def test_fused_head_equals_logits_path(kind, bias, tied, block, chunk):
    model, ids, labels = model_and_batch(bias, tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    vocab = NumberVocab.from_tokens(TOKENS)
    ref = reference_loss(model, ids, labels, vocab, kind)
    ref.backward()
    ref_grads = grads(model)
    model.zero_grad()
    seen = []
    config = NTLConfig(kind=kind, weight=0.3, fused_block_size=block, fused_token_chunk=chunk)
    fused = fused_head.install(model, HFLoss(vocab, config, on_output=seen.append))
    out = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    assert out.logits is None  # no [B, S, V] logits were made, and never the loss
    out.loss.backward()
    ours = grads(model)
    assert ours.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(ours[name], g, rtol=1e-5, atol=1e-6, msg=name)
    assert len(seen) == 1 and seen[0].ce.item() == pytest.approx(
        F.cross_entropy(model(input_ids=ids).logits[:, :-1].reshape(-1, 64),
                        labels[:, 1:].reshape(-1)).item(), rel=1e-5)
    fused.remove()


def test_without_labels_gives_logits_and_install_is_idempotent_and_reversible():
    model, ids, labels = model_and_batch()
    vocab = NumberVocab.from_tokens(TOKENS)
    stock_logits = model(input_ids=ids).logits
    stock_loss = model(input_ids=ids, labels=labels).loss
    fused = fused_head.install(model, HFLoss(vocab, NTLConfig()))
    fused.install(model)  # second install: no-op
    torch.testing.assert_close(model(input_ids=ids).logits, stock_logits)
    by_keyword = model(input_ids=ids, labels=labels).loss
    positional = model(ids, None, None, None, None, labels).loss  # labels found by signature
    assert positional.dim() == 0 and positional.item() == by_keyword.item()
    with pytest.raises(ValueError, match="hidden .* and labels .* do not match"):
        model(input_ids=ids, labels=labels, logits_to_keep=1)
    fused.remove()
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, stock_loss)
    assert not hasattr(model.lm_head.forward, "__wrapped__")
    assert "forward" not in vars(model.lm_head) and "_loss_function" not in vars(model)


def test_eval_with_labels_gives_real_logits_and_the_materialised_loss():
    model, ids, labels = model_and_batch()
    vocab = NumberVocab.from_tokens(TOKENS)
    ref = reference_loss(model, ids, labels, vocab, "was")
    stock_logits = model(input_ids=ids).logits
    fused = fused_head.install(model, HFLoss(vocab, NTLConfig(weight=0.3)))
    model.eval()
    out = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.logits, stock_logits)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    fused.remove()


def test_models_that_post_process_the_head_are_refused():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2,
                                           num_key_value_heads=1, head_dim=16,
                                           final_logit_softcapping=30.0))
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        fused_head.install(model, HFLoss(NumberVocab.from_tokens(TOKENS), NTLConfig()))


@pytest.mark.parametrize("path", ["logits", "fused"])
def test_num_items_in_batch_weights_the_micro_batch_loss_by_its_valid_tokens(path):
    """HF Trainer passes num_items_in_batch (valid tokens of the whole accumulated batch) and
    then does not divide by the accumulation steps: the loss is (CE mean + 0.3 NTL mean) times
    this micro-batch's valid tokens / num_items -- CE exactly transformers' sum / num_items, NTL
    with its own normalisation (not diluted over all valid tokens)."""
    import ntl_deepspeed.patches.transformers as patch

    model, ids, labels = model_and_batch()
    vocab = NumberVocab.from_tokens(TOKENS)
    logits = model(input_ids=ids).logits
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    valid = int((shifted != -100).sum())
    n_items = 50  # e.g. this micro-batch's valid tokens + the next micro-batch's
    ref = (F.cross_entropy(logits.reshape(-1, 64), shifted.reshape(-1), reduction="sum")
           + 0.3 * valid * ntl_loss(logits, shifted, vocab, "was")) / n_items
    if path == "fused":
        undo = fused_head.install(model, HFLoss(vocab, NTLConfig(weight=0.3))).remove
    else:
        patch.apply(vocab, NTLConfig(weight=0.3), model=model)
        undo = lambda: patch.remove(model)  # noqa: E731
    try:
        for n in (n_items, torch.tensor(n_items)):
            loss = model(input_ids=ids, labels=labels, num_items_in_batch=n).loss
            torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
        # the whole batch in one micro-batch: the same loss as without num_items_in_batch
        whole = model(input_ids=ids, labels=labels, num_items_in_batch=valid).loss
        torch.testing.assert_close(whole, model(input_ids=ids, labels=labels).loss)
    finally:
        undo()
