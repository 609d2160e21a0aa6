"""Hugging Face transformers: CE + lambda*NTL as the causal-LM loss, by one runtime patch.

``apply(vocab, config)`` replaces ``LOSS_MAPPING["ForCausalLM"]`` (used by every ``*ForCausalLM``
whose ``loss_function`` was not set explicitly); ``apply(vocab, config, model=m)`` patches one
model only. Labels are shifted as transformers does. For DeepSpeed AutoTP's vocab-parallel head,
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


_global_patch = _loss_patch()
_model_patches: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def apply(vocab: NumberVocab, config: Optional[NTLConfig] = None, model=None, tp_group=None,
          vocab_start_index: Optional[int] = None, dp_group=None, on_output=None,
          sp_group=None, sp_grads_averaged: bool = False) -> HFLoss:
    """Install CE + lambda*NTL globally, or on ``model`` only. Returns the :class:`HFLoss`
    (``sp_group``/``sp_grads_averaged``: sequence parallelism, see :class:`HFLoss`)."""
    loss = HFLoss(vocab, as_config(config), tp_group, vocab_start_index, dp_group, on_output,
                  sp_group, sp_grads_averaged)
    if model is None:
        patch, slot = _global_patch, Slot(_mapping(), "ForCausalLM", item=True)
    else:
        patch = _model_patches.setdefault(model, _loss_patch())
        slot = Slot(model, "loss_function", backing="_loss_function")
    patch.settings = loss.loss_function()
    patch.install(slot)
    return loss


def remove(model=None) -> None:
    """Restore the original loss (globally, or on ``model``). No-op when not patched."""
    patch = _global_patch if model is None else _model_patches.pop(model, None)
    if patch is not None:
        patch.remove()


def is_applied(model=None) -> bool:
    patch = _global_patch if model is None else _model_patches.get(model)
    return patch is not None and patch.applied
