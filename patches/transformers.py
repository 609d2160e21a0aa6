"""Hugging Face transformers: CE + lambda*NTL as the causal-LM loss, by one runtime patch.

``apply(vocab, config)`` gives every model whose ``loss_function`` resolves to
``LOSS_MAPPING["ForCausalLM"]`` (every ``*ForCausalLM`` whose ``loss_function`` was not set
explicitly) our loss instead, through ``PreTrainedModel.loss_function`` (the property transformers
resolves it in). ``LOSS_MAPPING`` itself is left alone: ``Trainer`` (5.x) counts
``num_items_in_batch`` on shifted labels only when it finds the stock ``ForCausalLMLoss`` there,
so replacing it would scale the loss by valid/(valid + rows) under gradient accumulation.
``apply(vocab, config, model=m)`` patches one model only. Labels are shifted as transformers does. For DeepSpeed AutoTP's vocab-parallel head,
pass ``tp_group`` and ``vocab_start_index`` (``ntl_deepspeed.integrations.deepspeed.install``
does this for you). ``remove()`` restores the original. Idempotent: a second ``apply`` only
updates the settings.
"""
from __future__ import annotations

import weakref
from typing import Optional

from ntl_deepspeed.config import NTLConfig, as_config
from ntl_deepspeed.numbers import NumberVocab

from ._patching import Patch, Slot
from .hf_loss import HFLoss

TARGET = "transformers.loss.loss_utils.LOSS_MAPPING['ForCausalLM']"
PROPERTY_TARGET = "transformers.modeling_utils.PreTrainedModel.loss_function"


def _mapping():
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING
    except ImportError as e:
        raise ImportError(f"ntl_deepspeed.patches.transformers needs {TARGET} ({e})") from None
    if "ForCausalLM" not in LOSS_MAPPING:
        raise KeyError(f"the installed transformers has no {TARGET}")
    return LOSS_MAPPING


def _loss_patch() -> Patch:
    """A patch whose wrapper runs the settings currently stored on it (``patch.settings``)."""
    patch = Patch(lambda original: lambda *args, **kwargs: patch.settings(*args, **kwargs))
    return patch


class _CausalLMLoss:
    """Replaces the ``PreTrainedModel.loss_function`` property: a model whose loss resolves to
    ``LOSS_MAPPING["ForCausalLM"]`` (no loss set on it, a ``loss_type`` of ``ForCausalLM`` or one
    transformers does not know) gets ``loss``; everything else (an explicit loss, other loss
    types) goes through the original property unchanged, setter included."""

    def __init__(self, original: property):
        self.__wrapped__ = original
        self.loss = None  # the current settings' loss function

    def __get__(self, model, owner=None):
        found = self.__wrapped__.__get__(model, owner)
        if model is None or self.loss is None or hasattr(model, "_loss_function"):
            return found
        loss_type = getattr(model, "loss_type", None)
        return self.loss if (loss_type if loss_type in _mapping() else "ForCausalLM") \
            == "ForCausalLM" else found

    def __set__(self, model, value):
        self.__wrapped__.__set__(model, value)


def _pretrained_model():
    try:
        from transformers.modeling_utils import PreTrainedModel
    except ImportError as e:
        raise ImportError(f"ntl_deepspeed.patches.transformers needs {PROPERTY_TARGET} ({e})") \
            from None
    if not isinstance(vars(PreTrainedModel).get("loss_function"), (property, _CausalLMLoss)):
        raise AttributeError(f"the installed transformers has no property {PROPERTY_TARGET}")
    return PreTrainedModel


def _apply_globally(loss_function) -> None:
    cls = _pretrained_model()
    _mapping()  # the stock mapping must exist
    current = vars(cls)["loss_function"]
    if not isinstance(current, _CausalLMLoss):
        current = _CausalLMLoss(current)
        cls.loss_function = current
    current.loss = loss_function


def _remove_globally() -> None:
    try:
        cls = _pretrained_model()
    except (ImportError, AttributeError):
        return
    current = vars(cls)["loss_function"]
    if isinstance(current, _CausalLMLoss):
        cls.loss_function = current.__wrapped__


def _applied_globally() -> bool:
    try:
        current = vars(_pretrained_model())["loss_function"]
    except (ImportError, AttributeError):
        return False
    return isinstance(current, _CausalLMLoss) and current.loss is not None


_model_patches: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def apply(vocab: NumberVocab, config: Optional[NTLConfig] = None, model=None, tp_group=None,
          vocab_start_index: Optional[int] = None, dp_group=None, on_output=None,
          sp_group=None, sp_grads_averaged: bool = False) -> HFLoss:
    """Install CE + lambda*NTL globally, or on ``model`` only. Returns the :class:`HFLoss`
    (``sp_group``/``sp_grads_averaged``: sequence parallelism, see :class:`HFLoss`)."""
    loss = HFLoss(vocab, as_config(config), tp_group, vocab_start_index, dp_group, on_output,
                  sp_group, sp_grads_averaged)
    if model is None:
        _apply_globally(loss.loss_function())
        return loss
    patch = _model_patches.setdefault(model, _loss_patch())
    patch.settings = loss.loss_function()
    patch.install(Slot(model, "loss_function", backing="_loss_function"))
    return loss


def remove(model=None) -> None:
    """Restore the original loss (globally, or on ``model``). No-op when not patched."""
    if model is None:
        _remove_globally()
        return
    patch = _model_patches.pop(model, None)
    if patch is not None:
        patch.remove()


def is_applied(model=None) -> bool:
    if model is None:
        return _applied_globally()
    patch = _model_patches.get(model)
    return patch is not None and patch.applied
