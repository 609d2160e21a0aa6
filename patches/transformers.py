"""Hugging Face transformers: CE + lambda*NTL as the causal-LM loss, by one runtime patch.

``apply(vocab, config)`` replaces ``LOSS_MAPPING["ForCausalLM"]`` (used by every ``*ForCausalLM``
whose ``loss_function`` was not set explicitly); ``apply(vocab, config, model=m)`` patches one
model only. Labels are shifted as transformers does. For DeepSpeed AutoTP's vocab-parallel head,
pass ``tp_group`` and ``vocab_start_index`` (the DeepSpeed integration does this for you).
``remove()`` restores the original. Idempotent.
"""
from __future__ import annotations

from typing import Optional

from ntl_deepspeed import NTLConfig, NumberVocab
from ntl_deepspeed.integrations.hf_loss import make_causal_lm_loss

TARGET = "transformers.loss.loss_utils.LOSS_MAPPING['ForCausalLM']"
_MARK = "__ntl_deepspeed_patch__"


def _mapping():
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING
    except ImportError as e:
        raise ImportError(f"ntl_deepspeed.patches.transformers needs {TARGET} ({e})") from None
    if "ForCausalLM" not in LOSS_MAPPING:
        raise KeyError(f"the installed transformers has no {TARGET}")
    return LOSS_MAPPING


def apply(vocab: NumberVocab, config: Optional[NTLConfig] = None, model=None, tp_group=None,
          vocab_start_index: Optional[int] = None, on_output=None):
    """Install CE + lambda*NTL globally, or on ``model`` only. Returns the loss function."""
    loss = make_causal_lm_loss(vocab, config or NTLConfig(), tp_group=tp_group,
                               vocab_start_index=vocab_start_index, on_output=on_output)
    setattr(loss, _MARK, True)
    if model is not None:
        current = model.loss_function
        loss.__wrapped__ = getattr(current, "__wrapped__", current)
        model.loss_function = loss
        return loss
    mapping = _mapping()
    current = mapping["ForCausalLM"]
    loss.__wrapped__ = getattr(current, "__wrapped__", current) if getattr(current, _MARK,
                                                                           False) else current
    mapping["ForCausalLM"] = loss
    return loss


def remove(model=None) -> None:
    """Restore the original loss (globally, or on ``model``). No-op when not patched."""
    if model is not None:
        current = model.loss_function
        if getattr(current, _MARK, False):
            del model._loss_function
        return
    mapping = _mapping()
    current = mapping["ForCausalLM"]
    if getattr(current, _MARK, False):
        mapping["ForCausalLM"] = current.__wrapped__


def is_applied(model=None) -> bool:
    current = model.loss_function if model is not None else _mapping()["ForCausalLM"]
    return getattr(current, _MARK, False)
