"""ntl-deepspeed: Number Token Loss as a vocab-parallel, fused CE+NTL op.

The front door is :func:`ce_ntl` (logits, or hidden states + LM head); :class:`NTLConfig` holds
every option; :class:`NumberVocab` knows which tokens are numbers and hands each tensor-parallel
rank its :class:`VocabShard`. :func:`ntl_loss` / :func:`number_level_loss` are the single-device
oracle. In a user's DeepSpeed script, :func:`initialize` (a drop-in for
``deepspeed.initialize``) or :func:`install` (an engine or model built elsewhere) add NTL from
the config's ``"ntl"`` section. Framework adapters: :mod:`ntl_deepspeed.patches` (transformers,
fused head, Megatron-core), :mod:`ntl_deepspeed.integrations` (DeepSpeed, HF Trainer).
"""
from .config import NTLConfig
from .integrations.deepspeed import initialize, install
from .loss import CENTLOutput, ce_ntl
from .numbers import NumberVocab, VocabShard
from .reference import ntl_loss, number_level_loss

__all__ = ["CENTLOutput", "NTLConfig", "NumberVocab", "VocabShard", "ce_ntl", "initialize",
           "install", "ntl_loss", "number_level_loss"]
__version__ = "0.3.0"
