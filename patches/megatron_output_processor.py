"""NTL through megatron-core's own hook (0.18+), without patching anything:
``GPTModel.forward(..., output_processor=NTLOutputProcessor(vocab, config))``.

``GPTModel._postprocess`` calls the processor after the MTP heads' losses and instead of the
output layer, with the hidden states, the output layer and its (shared) weight, the labels,
``scale_logits`` (MuP) and more; its return value is what the model returns. With labels the
processor returns the main head's per-token ``ce + lambda * ntl`` ``[b, s]`` -- from the logits,
or with ``config.fused_head`` from the hidden states (no logits) -- exactly what the runtime
patch (:mod:`.megatron_core`) computes; without labels the ``[b, s, V/tp]`` logits as Megatron
returns them. The MTP heads are not its business: they keep Megatron's CE (NTL on them needs
the patch with ``include_mtp``). HybridModel (0.19) has no such hook: use the patch there.

It must be passed on every forward (e.g. from ``forward_step`` in ``pretrain_gpt.py``)::

    ntl_head = NTLOutputProcessor(vocab, NTLConfig(weight=0.3, fused_head=True))
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels,
                          loss_mask=loss_mask, output_processor=ntl_head)
"""
from __future__ import annotations

from typing import Optional

import torch

from ntl_deepspeed import NTLConfig, NumberVocab
from ntl_deepspeed.config import as_config

from . import megatron_heads as heads


class NTLOutputProcessor:
    """The main head's CE + lambda*NTL as a megatron-core ``output_processor`` (see module).

    Collectives: those of :func:`.megatron_heads.logits_loss` (two forward all-reduces on the
    output layer's TP group) or, fused, of :func:`.megatron_heads.fused_loss` (plus the hidden
    states' TP region op); no others. ``report_entry(loss_mask)`` gives the last call's
    ``[masked NTL sum, masked number-label count]`` for Megatron-LM's logging."""

    def __init__(self, vocab: NumberVocab, config: Optional[NTLConfig] = None):
        self.vocab, self.config = vocab, as_config(config)
        self._last = None

    def __call__(self, *, hidden_states, output_layer, output_weight=None, labels=None,
                 runtime_gather_output=None, inference_context=None, scale_logits=None,
                 compute_language_model_loss=None, **_unused):
        if inference_context is not None:
            raise ValueError("NTLOutputProcessor computes training/eval losses; do not pass it "
                             "to inference forwards (Megatron's own path slices the last token)")
        if labels is not None and self.config.enabled and self.config.fused_head:
            out = heads.fused_loss(self.vocab, self.config, labels, hidden_states, output_layer,
                                   output_weight, heads.constant_scale(
                                       scale_logits, "the model's scale_logits"))
            return self._loss(out)
        logits, _ = output_layer(hidden_states, weight=output_weight,
                                 runtime_gather_output=runtime_gather_output)
        if scale_logits is not None:
            logits = scale_logits(logits)
        if labels is None:
            return logits.transpose(0, 1).contiguous()  # [s, b, V/tp] -> [b, s, V/tp]
        if not self.config.enabled:
            return compute_language_model_loss(labels, logits)
        group = output_layer.tp_group
        if group is not None and torch.distributed.get_world_size(group) == 1:
            group = None
        return self._loss(heads.logits_loss(self.vocab, self.config, labels, logits, group))

    def _loss(self, out) -> torch.Tensor:
        self._last = heads.ntl_record(out)
        return heads.per_token(out)

    def report_entry(self, loss_mask: torch.Tensor) -> Optional[torch.Tensor]:
        return heads.report_entry(self._last, loss_mask)
