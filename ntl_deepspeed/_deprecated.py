"""The 0.1 entry points, kept for one release: thin aliases of :func:`ntl_deepspeed.ce_ntl`."""
from __future__ import annotations

import functools
import warnings
from typing import Optional

from .config import NTLConfig
from .loss import CENTLOutput, ce_ntl
from .numbers import NumberVocab


def _deprecated(new: str):
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            warnings.warn(f"{fn.__name__} is deprecated and will be removed in 0.3; use {new}",
                          DeprecationWarning, stacklevel=2)
            return fn(*args, **kwargs)
        return wrapper
    return decorate


def _config(config: Optional[NTLConfig], check_finite: Optional[bool], overrides) -> NTLConfig:
    """``config`` with the arguments that were actually given."""
    given = {k: v for k, v in dict(check_finite=check_finite, **overrides).items()
             if v is not None}
    return (config or NTLConfig()).replace(**given)


@_deprecated("ce_ntl(labels, vocab.shard_for(width, tp_group, start), config, logits=...)")
def vocab_parallel_ce_ntl(logits, labels, number_vocab: NumberVocab, tp_group=None,
                          config: Optional[NTLConfig] = None, *, vocab_start_index=None,
                          loss_weights=None, reduction: str = "mean", dp_group=None,
                          check_finite: Optional[bool] = None, **overrides) -> CENTLOutput:
    shard = number_vocab.shard_for(logits.shape[-1], tp_group, vocab_start_index, logits.device)
    return ce_ntl(labels, shard, _config(config, check_finite, overrides), logits=logits,
                  loss_weights=loss_weights, reduction=reduction, dp_group=dp_group)


@_deprecated("ce_ntl(labels, shard, config, hidden=..., head_weight=..., head_bias=...)")
def fused_linear_ce_ntl(hidden, weight, labels, number_vocab: NumberVocab, tp_group=None,
                        config: Optional[NTLConfig] = None, *, bias=None, vocab_start_index=None,
                        block_size: Optional[int] = None, token_chunk: Optional[int] = None,
                        loss_weights=None, reduction: str = "mean", dp_group=None,
                        check_finite: Optional[bool] = None, gemm_dtype=None,
                        **overrides) -> CENTLOutput:
    shard = number_vocab.shard_for(weight.shape[0], tp_group, vocab_start_index, hidden.device)
    config = _config(config, check_finite, dict(overrides, fused_block_size=block_size,
                                                fused_token_chunk=token_chunk))
    return ce_ntl(labels, shard, config, hidden=hidden, head_weight=weight, head_bias=bias,
                  loss_weights=loss_weights, reduction=reduction, dp_group=dp_group,
                  gemm_dtype=gemm_dtype)
