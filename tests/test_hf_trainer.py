"""transformers' Trainer with the patched loss: gradient accumulation gives the same update as
one big batch (Trainer passes num_items_in_batch and then does not divide by the steps)."""
import pytest
import torch

from ntl_deepspeed import NTLConfig, NumberVocab
from tiny_llama import TOKENS, model_and_batch


def one_sgd_step(tmp_path, batch, accumulation, fused):
    from transformers import Trainer, TrainingArguments

    import ntl_deepspeed.patches.transformers as patch
    from ntl_deepspeed.patches import fused_head
    from ntl_deepspeed.patches.hf_loss import HFLoss

    model, ids, labels = model_and_batch()
    ids, labels = ids.repeat(2, 1), labels.repeat(2, 1)  # 4 rows
    labels[2, 4:] = -100  # rows with different valid-token counts: means and sums differ
    vocab = NumberVocab.from_tokens(TOKENS)
    if fused:
        fused_head.install(model, HFLoss(vocab, NTLConfig(weight=0.3)))
    else:
        patch.apply(vocab, NTLConfig(weight=0.3), model=model)
    rows = [{"input_ids": i, "labels": l} for i, l in zip(ids[[2, 0, 1, 3]], labels[[2, 0, 1, 3]])]
    args = TrainingArguments(output_dir=str(tmp_path / f"{batch}x{accumulation}"),
                             per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulation, max_steps=1,
                             learning_rate=0.5, lr_scheduler_type="constant", optim="sgd",
                             weight_decay=0.0, max_grad_norm=0.0, report_to=[], use_cpu=True,
                             save_strategy="no", logging_strategy="no", seed=0,
                             dataloader_drop_last=False)
    Trainer(model=model, args=args, train_dataset=rows).train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("fused", [False, True])
def test_accumulated_step_equals_one_big_batch(tmp_path, fused):
    big = one_sgd_step(tmp_path, batch=4, accumulation=1, fused=fused)
    accumulated = one_sgd_step(tmp_path, batch=2, accumulation=2, fused=fused)
    start, _, _ = model_and_batch()
    moved = 0
    for name, p in big.items():
        torch.testing.assert_close(accumulated[name], p, rtol=1e-5, atol=1e-6, msg=name)
        moved += int(not torch.equal(p, dict(start.named_parameters())[name]))
    assert moved > 0  # the step did update the model
