"""Let a Hugging Face causal LM's ``lm_head`` compute CE + lambda*NTL without the logits.

With labels, the head's forward runs :func:`~ntl_deepspeed.fused_linear_ce_ntl` on the hidden
states and returns the loss (a scalar) in place of the logits; the model's ``loss_function``
then passes that loss through. Without labels (generation, evaluation) the head is untouched
and returns logits.

Why inside the head's forward: under ZeRO-3 the head's weight is gathered only while its own
module runs, and ZeRO's backward hooks attach to the module's outputs; returning the loss from
the head gives the fused op a gathered weight in forward and in backward, with no extra gather.
For DeepSpeed AutoTP's vocab-parallel head the hidden states first pass an identity whose
backward all-reduces their gradient over the TP group, as the head's own forward does.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..config import NTLConfig
from ..loss import CENTLOutput
from ..numbers import NumberVocab
from ..ops.fused_linear import (DEFAULT_BLOCK, DEFAULT_TOKEN_CHUNK, check_blocking,
                                fused_linear_ce_ntl)
from .hf_loss import (check_ignore_index, local_number_count, reduction_for, scaled_loss,
                      shift_left)
from .flops import record_ce_ntl_flops

_MARK = "__ntl_fused_head__"


class _AllReduceGradOverTP(torch.autograd.Function):
    """Identity forward; backward sums the gradient over ``group`` (each TP rank holds the
    hidden-state gradient of its vocab slice only)."""

    @staticmethod
    def forward(ctx, hidden, group):
        ctx.group = group
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def _labels_argument(forward) -> Callable:
    """``(args, kwargs) -> (labels, shift_labels, num_items_in_batch)`` for the model's forward
    signature."""
    signature = inspect.signature(forward)

    def find(args, kwargs):
        labels = kwargs.get("labels")
        if labels is None and args:
            labels = signature.bind_partial(*args, **kwargs).arguments.get("labels")
        return labels, kwargs.get("shift_labels"), kwargs.get("num_items_in_batch")

    return find


class FusedHeadLoss:
    """Installs the fused head on a ``*ForCausalLM`` model (see the module docstring).

    ``tp_group``/``vocab_start_index`` describe a vocab-parallel head (AutoTP: its ``mp_group``
    and ``vocab_start_index``); ``dp_group`` is used for ``"global"`` normalization.
    ``on_output`` receives every :class:`CENTLOutput`. ``remove()`` restores the model.
    """

    def __init__(self, vocab: NumberVocab, config: NTLConfig, tp_group=None,
                 vocab_start_index: Optional[int] = None, dp_group=None,
                 block_size: int = DEFAULT_BLOCK, token_chunk: int = DEFAULT_TOKEN_CHUNK,
                 on_output: Optional[Callable[[CENTLOutput], None]] = None,
                 check_finite: bool = False):
        check_blocking(block_size, token_chunk)  # at install, not at the first step
        self.vocab, self.config, self.tp_group = vocab, config, tp_group
        self.vocab_start_index, self.dp_group = vocab_start_index, dp_group
        self.block_size, self.token_chunk = block_size, token_chunk
        self.on_output, self.check_finite = on_output, check_finite
        self._labels = None  # (labels, shift_labels, num_items_in_batch) of the running forward
        self._head_returned_loss = False
        self._handles, self._model, self._head = [], None, None

    # ------------------------------------------------------------------ install / remove
    def install(self, model):
        head = model.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise TypeError(f"{type(model).__name__}.get_output_embeddings() returned {head!r}: "
                            "the fused head needs an lm_head with a weight")
        if getattr(head.forward, _MARK, False):
            return self  # already installed
        find_labels = _labels_argument(model.forward)
        original = head.forward

        def capture(_module, args, kwargs):
            self._labels = find_labels(args, kwargs)
            self._head_returned_loss = False

        def release(_module, _args, _kwargs, output):
            self._labels = None
            return output

        def fused_forward(hidden, *args, **kwargs):
            labels, shift_labels, num_items = self._labels or (None, None, None)
            if labels is None and shift_labels is None:  # generation / eval: logits
                return original(hidden, *args, **kwargs)
            self._labels = None  # one loss per model forward
            loss = self._loss(head, hidden, labels, shift_labels, num_items)
            self._head_returned_loss = True
            return loss

        setattr(fused_forward, _MARK, True)
        fused_forward.__wrapped__ = original
        head.forward = fused_forward
        self._handles = [model.register_forward_pre_hook(capture, with_kwargs=True),
                         model.register_forward_hook(release, with_kwargs=True)]
        self._model, self._head = model, head
        model.loss_function = self._pass_through_loss
        return self

    def remove(self) -> None:
        if self._head is None:
            return
        for handle in self._handles:
            handle.remove()
        del self._head.forward  # the class's forward again
        if getattr(self._model, "_loss_function", None) == self._pass_through_loss:
            del self._model._loss_function
        self._handles, self._model, self._head = [], None, None

    # ------------------------------------------------------------------ the loss
    def _loss(self, head, hidden, labels, shift_labels, num_items_in_batch):
        if shift_labels is None:
            shift_labels = shift_left(labels, self.config.ignore_index)
        shift_labels = shift_labels.to(hidden.device)
        if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            hidden = _AllReduceGradOverTP.apply(hidden, self.tp_group)
        out = fused_linear_ce_ntl(hidden, head.weight, shift_labels, self.vocab, self.tp_group,
                                  self.config, bias=getattr(head, "bias", None),
                                  vocab_start_index=self.vocab_start_index,
                                  block_size=self.block_size, token_chunk=self.token_chunk,
                                  dp_group=self.dp_group, check_finite=self.check_finite,
                                  reduction=reduction_for(num_items_in_batch))
        width = head.weight.shape[0]
        record_ce_ntl_flops(shift_labels.numel(), width,
                            local_number_count(self.vocab, self.vocab_start_index, width))
        if self.on_output is not None:
            self.on_output(out)
        return scaled_loss(out, num_items_in_batch)

    def _pass_through_loss(self, logits, labels=None, vocab_size=None, num_items_in_batch=None,
                           ignore_index: int = -100, **_):
        check_ignore_index(ignore_index, self.config)
        if not self._head_returned_loss:
            raise RuntimeError("fused head: the model asked for its loss but lm_head did not "
                               "compute it (was the head called with logits_to_keep != 0, or "
                               "outside the model's forward?)")
        self._head_returned_loss = False
        return logits  # the head's output is the loss
