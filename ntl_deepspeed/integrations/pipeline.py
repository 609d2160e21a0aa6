"""DeepSpeed pipeline parallelism (``deepspeed.pipe.PipelineModule``): CE + lambda*NTL on the
last stage.

    metrics = NTLMetrics()
    loss_fn = PipelineNTLLoss(vocab, NTLConfig(weight=0.3), on_output=metrics)
    module = PipelineModule(layers=[..., LayerSpec(FusedLMHead, hidden, vocab_size)],
                            loss_fn=loss_fn, num_stages=2)   # tied embeddings: tied_head
    loss_fn.bind(module)               # its DP group: normalization="global", metrics
    engine, *_ = deepspeed.initialize(model=module, config=ds_config, ...)  # ZeRO stage <= 1
    loss = engine.train_batch(data_iter)          # data_iter yields (inputs, shifted labels)
    if engine.is_last_stage(): metrics.reduce(loss_fn.dp_group)   # CE, NTL, accuracy, MAE

DeepSpeed calls ``loss_fn(outputs, labels)`` on the last stage only, with the last layer's
output and the micro-batch's labels (already shifted: aligned with the outputs). That output is
either logits ``[..., V]`` (any head) or, from :class:`FusedLMHead` in training, the head's
inputs -- then the loss is computed from the hidden states block by block and the logits never
exist. The last stage holds whole sequences, so the normalisation is the plain one
(:func:`ntl_deepspeed.loss.token_weights`); pipeline parallelism adds no collective to the loss.
DeepSpeed averages the micro-batches' losses over gradient accumulation, as without pipeline.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..config import NTLConfig, as_config
from ..loss import CENTLOutput, ce_ntl
from ..numbers import NumberVocab
from .sequence_parallel import check_sequence_parallel, sequence_parallel_groups


class HeadInputs(NamedTuple):
    """What :class:`FusedLMHead` hands the loss instead of logits."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]


class FusedLMHead(torch.nn.Module):
    """The LM head as a pipeline's last layer: ``weight`` ``[vocab_size, hidden_size]`` (+
    ``bias``), initialised like ``torch.nn.Linear``. In training it returns
    :class:`HeadInputs` for :class:`PipelineNTLLoss`; in eval mode, real logits."""

    def __init__(self, hidden_size: int, vocab_size: int, bias: bool = False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(vocab_size, hidden_size))
        self.bias = torch.nn.Parameter(torch.empty(vocab_size)) if bias else None
        torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            torch.nn.init.uniform_(self.bias, -hidden_size ** -0.5, hidden_size ** -0.5)

    def forward(self, hidden: torch.Tensor):
        if self.training:
            return HeadInputs(hidden, self.weight, self.bias)
        return F.linear(hidden, self.weight, self.bias)


def tied_head(embedding: torch.nn.Module, hidden: torch.Tensor):
    """``forward_fn`` of a ``TiedLayerSpec`` that reuses the input embedding as the LM head
    (tied weights): :class:`HeadInputs` in training, logits in eval mode.

        TiedLayerSpec("embed", torch.nn.Embedding, vocab_size, hidden, forward_fn=tied_head)
    """
    if embedding.training:
        return HeadInputs(hidden, embedding.weight, None)
    return F.linear(hidden, embedding.weight)


class PipelineNTLLoss:
    """``loss_fn`` of a ``PipelineModule``: ``CE + config.weight * NTL`` from logits or from
    :class:`FusedLMHead`'s :class:`HeadInputs`. ``on_output`` receives every
    :class:`CENTLOutput` (e.g. :class:`ntl_deepspeed.metrics.NTLMetrics`). Collectives: those of
    :func:`ntl_deepspeed.ce_ntl` without TP -- one all-reduce of a scalar on ``dp_group`` for
    ``normalization="global"``, none otherwise."""

    def __init__(self, vocab: NumberVocab, config: Optional[NTLConfig] = None, *,
                 on_output: Optional[Callable[[CENTLOutput], None]] = None, dp_group=None):
        if not isinstance(vocab, NumberVocab):
            raise TypeError(f"PipelineNTLLoss needs a NumberVocab, got {type(vocab).__name__}")
        self.vocab = vocab
        self.config = as_config(config or NTLConfig())
        self.on_output = on_output if self.config.log_metrics else None
        self.dp_group = dp_group

    def bind(self, module) -> "PipelineNTLLoss":
        """Take the data-parallel group of the pipeline ``module`` (its ranks of the same
        stage), for ``normalization="global"`` and for the metrics."""
        grid = getattr(module, "_grid", None)
        if grid is None:
            raise TypeError(f"bind: {type(module).__name__} is not a deepspeed.pipe."
                            "PipelineModule (no _grid)")
        sp = sequence_parallel_groups()
        check_sequence_parallel(self.config, sp.sp_size if sp else 1,
                                vocab_parallel_head=False, pipeline=True)
        self.dp_group = grid.get_data_parallel_group()
        return self

    def __call__(self, outputs, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, HeadInputs):
            width, device = outputs.weight.shape[0], outputs.hidden.device
            inputs = {"hidden": outputs.hidden, "head_weight": outputs.weight,
                      "head_bias": outputs.bias}
        elif torch.is_tensor(outputs):
            width, device = outputs.shape[-1], outputs.device
            inputs = {"logits": outputs}
        else:
            raise TypeError("PipelineNTLLoss: the last layer must return logits or "
                            f"FusedLMHead's HeadInputs, got {type(outputs).__name__}")
        shard = self.vocab.shard_for(width, device=device)
        out = ce_ntl(labels.to(device), shard, self.config, dp_group=self.dp_group, **inputs)
        if self.on_output is not None:
            self.on_output(out)
        return out.loss
