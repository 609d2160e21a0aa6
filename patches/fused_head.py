"""Let a Hugging Face causal LM's ``lm_head`` compute CE + lambda*NTL without the logits.

While the model trains and is called with labels, the head's forward runs
:func:`~ntl_deepspeed.ce_ntl` on the hidden states and its own weight (and bias) and returns the
loss (a scalar) in place of the logits; the model's ``loss_function`` then passes that loss
through (``outputs.logits`` is then None, never the loss). Without labels, or in eval mode, the
head is untouched: real logits, and the loss (if labels are given) on those logits.

Why inside the head's forward: under ZeRO-3 the head's weight is gathered only while its own
module runs, and ZeRO's backward hooks attach to the module's outputs; returning the loss from
the head gives the op a gathered weight in forward and in backward, with no extra gather.
For DeepSpeed AutoTP's vocab-parallel head the hidden states first pass an identity whose
backward all-reduces their gradient over the TP group, as the head's own forward does.

Models that post-process the head's output inside their forward (Gemma 2/3's
``final_logit_softcapping``) would apply that to the loss: they are refused with a clear error.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.distributed as dist

from ntl_deepspeed.parallel import group_size

from ._patching import Patch, Slot
from .hf_loss import HFLoss

# model config attributes that post-process the LM head's output inside the model's forward
POST_PROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale",
                   "logits_scaling")


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


def check_no_post_processing(model) -> None:
    config = getattr(model, "config", None)
    found = {a: getattr(config, a) for a in POST_PROCESSING if getattr(config, a, None)
             not in (None, 0, 1, 1.0, False)}
    if found:
        raise ValueError(f"{type(model).__name__} post-processes its LM head's output ({found}): "
                         "the fused head would apply that to the loss. Use the materialised "
                         "path (ntl.fused_head false) for this model")


class FusedHead:
    """The fused head of one model (see the module docstring); ``remove()`` restores it."""

    def __init__(self, loss: HFLoss):
        self.loss = loss
        self._pending = None  # (labels, shift_labels, num_items_in_batch) of the running forward
        self._head_returned_loss = False
        self._hooks = []
        self._head_patch = Patch(self._head_forward)
        self._loss_patch = Patch(lambda original: self._pass_through_loss(original))

    def install(self, model) -> "FusedHead":
        head = model.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise TypeError(f"{type(model).__name__}.get_output_embeddings() returned {head!r}: "
                            "the fused head needs an lm_head with a weight")
        check_no_post_processing(model)
        if self._head_patch.applied:
            return self
        find_labels = _labels_argument(model.forward)

        def capture(module, args, kwargs):
            self._pending = find_labels(args, kwargs) if module.training else None
            self._head_returned_loss = False

        def release(_module, _args, _kwargs, output):
            self._pending = None
            if self._head_returned_loss and hasattr(output, "logits"):
                output.logits = None  # never a loss in the logits field
            return output

        self._head = head
        self._head_patch.install(Slot(head, "forward"))
        self._loss_patch.install(Slot(model, "loss_function", backing="_loss_function"))
        self._hooks = [model.register_forward_pre_hook(capture, with_kwargs=True),
                       model.register_forward_hook(release, with_kwargs=True)]
        return self

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._head_patch.remove()
        self._loss_patch.remove()

    def _head_forward(self, original):
        head_of = self

        def forward(hidden, *args, **kwargs):
            labels, shift_labels, num_items = head_of._pending or (None, None, None)
            if labels is None and shift_labels is None:  # generation / eval: logits
                return original(hidden, *args, **kwargs)
            head_of._pending = None  # one loss per model forward
            head = head_of._head
            if group_size(head_of.loss.tp_group) > 1:
                hidden = _AllReduceGradOverTP.apply(hidden, head_of.loss.tp_group)
            weight = head.weight  # read once: a head may build it at each access
            loss = head_of.loss(labels, shift_labels, num_items, width=weight.shape[0],
                                device=hidden.device, hidden=hidden, head_weight=weight,
                                head_bias=getattr(head, "bias", None))
            head_of._head_returned_loss = True
            return loss

        return forward

    def _pass_through_loss(self, original):
        materialised = self.loss.loss_function()

        def loss_function(logits, labels=None, vocab_size=None, num_items_in_batch=None,
                          ignore_index: int = -100, **kwargs):
            self.loss.check_ignore_index(ignore_index)
            if not self._head_returned_loss:  # eval / no-grad forward: real logits
                if logits.dim() == 0:
                    raise RuntimeError("fused head: lm_head returned a loss outside the model's "
                                       "forward (was it called with logits_to_keep != 0?)")
                return materialised(logits, labels, vocab_size, num_items_in_batch,
                                    ignore_index, **kwargs)
            return logits  # the head's output is the loss

        return loss_function


def install(model, loss: HFLoss) -> FusedHead:
    """Install the fused head on a ``*ForCausalLM`` model."""
    return FusedHead(loss).install(model)
