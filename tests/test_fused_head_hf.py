"""The fused head on a Hugging Face Llama: same loss and parameter gradients as the model's
logits + F.cross_entropy + ntl_loss (the independent reference), and a clean install/remove."""
import pytest
import torch
import torch.nn.functional as F

from ntl_deepspeed import NTLConfig, NumberVocab, ntl_loss
from ntl_deepspeed.patches.fused_head import FusedHeadLoss
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
    fused = FusedHeadLoss(vocab, NTLConfig(kind=kind, weight=0.3), block_size=block,
                          token_chunk=chunk,
                          on_output=seen.append).install(model)
    out = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    assert out.logits is out.loss or out.logits.dim() == 0  # no [B, S, V] logits were made
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
    fused = FusedHeadLoss(vocab, NTLConfig()).install(model)
    FusedHeadLoss(vocab, NTLConfig()).install(model)  # second install: no-op
    torch.testing.assert_close(model(input_ids=ids).logits, stock_logits)
    by_keyword = model(input_ids=ids, labels=labels).loss
    positional = model(ids, None, None, None, None, labels).loss  # labels found by signature
    assert positional.dim() == 0 and positional.item() == by_keyword.item()
    with pytest.raises(ValueError, match="hidden .* and labels .* do not match"):
        model(input_ids=ids, labels=labels, logits_to_keep=1)
    fused.remove()
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, stock_loss)
    assert not hasattr(model.lm_head.forward, "__wrapped__")


@pytest.mark.parametrize("path", ["logits", "fused"])
def test_num_items_in_batch_follows_transformers_accumulation_convention(path):
    """HF Trainer passes num_items_in_batch (valid tokens of the whole accumulated batch) and
    then does not divide by the accumulation steps: the loss must be sum / num_items."""
    import ntl_deepspeed.patches.transformers as patch

    model, ids, labels = model_and_batch()
    vocab = NumberVocab.from_tokens(TOKENS)
    logits = model(input_ids=ids).logits
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    n_items = 50  # e.g. this micro-batch's 19 valid tokens + the next micro-batch's
    ref = (F.cross_entropy(logits.reshape(-1, 64), shifted.reshape(-1), reduction="sum")
           + 0.3 * ntl_loss(logits, shifted, vocab, "was", reduction="sum")) / n_items
    if path == "fused":
        undo = FusedHeadLoss(vocab, NTLConfig(weight=0.3)).install(model).remove
    else:
        patch.apply(vocab, NTLConfig(weight=0.3), model=model)
        undo = lambda: patch.remove(model)  # noqa: E731
    try:
        for n in (n_items, torch.tensor(n_items)):
            loss = model(input_ids=ids, labels=labels, num_items_in_batch=n).loss
            torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    finally:
        undo()
