"""transformers' Trainer with our loss: one optimizer step equals plain SGD on the documented
loss (micro-batch CE + 0.3 NTL weighted by its share of the step's valid tokens), with and
without gradient accumulation, materialised and fused head."""
import pytest
import torch
import torch.nn.functional as F

from ntl_deepspeed import NTLConfig, NumberVocab, ntl_loss
from tiny_llama import TOKENS, VOCAB, model_and_batch

LR = 0.5


def batch_rows():
    _, ids, labels = model_and_batch()
    ids, labels = ids.repeat(2, 1), labels.repeat(2, 1)  # 4 rows
    labels[2, 4:] = -100  # rows with different valid-token counts: means and sums differ
    labels[3, 1:6] = -100
    return ids, labels


def trainer_step(tmp_path, batch, accumulation, how):
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments

    import ntl_deepspeed.patches.transformers as patch
    from ntl_deepspeed.patches import fused_head
    from ntl_deepspeed.patches.hf_loss import HFLoss

    class InOrder(Trainer):  # micro-batches = consecutive rows, so the reference knows them
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    model, _, _ = model_and_batch()
    ids, labels = batch_rows()
    vocab = NumberVocab.from_tokens(TOKENS)
    if how == "fused":
        fused_head.install(model, HFLoss(vocab, NTLConfig(weight=0.3)))
    else:  # "global": every causal LM; Trainer must still count the shifted labels
        patch.apply(vocab, NTLConfig(weight=0.3), model=model if how == "model" else None)
    rows = [{"input_ids": i, "labels": l} for i, l in zip(ids, labels)]
    args = TrainingArguments(output_dir=str(tmp_path / f"{batch}x{accumulation}"),
                             per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulation, max_steps=1,
                             learning_rate=LR, lr_scheduler_type="constant", optim="sgd",
                             weight_decay=0.0, max_grad_norm=0.0, report_to=[], use_cpu=True,
                             save_strategy="no", logging_strategy="no", seed=0,
                             dataloader_drop_last=False)
    try:
        InOrder(model=model, args=args, train_dataset=rows).train()
    finally:
        patch.remove()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def reference_step(micro_batches):
    """Plain SGD on sum_i (CE_i + 0.3 NTL_i) * valid_i / N with F.cross_entropy and ntl_loss."""
    model, _, _ = model_and_batch()
    ids, labels = batch_rows()
    vocab = NumberVocab.from_tokens(TOKENS)
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    n_items = int((shifted != -100).sum())
    total = 0
    for rows in micro_batches:
        logits = model(input_ids=ids[rows]).logits
        y = shifted[rows]
        valid = int((y != -100).sum())
        ce = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        total = total + (ce + 0.3 * ntl_loss(logits, y, vocab, "was")) * valid / n_items
    total.backward()
    with torch.no_grad():
        return {n: p - LR * p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("how", ["model", "global", "fused"])
@pytest.mark.parametrize("batch,accumulation", [(4, 1), (2, 2)])
def test_trainer_step_equals_sgd_on_the_documented_loss(tmp_path, how, batch, accumulation):
    ours = trainer_step(tmp_path, batch, accumulation, how)
    expected = reference_step([list(range(i, i + batch)) for i in range(0, 4, batch)])
    for name, p in expected.items():
        torch.testing.assert_close(ours[name], p, rtol=1e-5, atol=1e-6, msg=name)
