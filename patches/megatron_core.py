"""Megatron-core: CE + lambda*NTL from the vocab-parallel logits, by one runtime patch.

``apply(vocab, config)`` wraps ``LanguageModule.compute_language_model_loss`` at class level (GPT,
Mamba, T5, BERT and the MTP heads all call it, only where ``post_process`` holds). The wrapper
computes CE *and* NTL with the fused op on the ``[s, b, V/tp]`` logits -- replacing Megatron's CE,
which overwrites fp32 logits in place -- and returns the per-token ``ce + lambda * ntl`` as
``[b, s]``, so loss masks, per-token-loss mode, context parallelism and microbatch scaling work
unchanged. The NTL of a token-level loss is thus normalised like the CE (by the masked token
count). Idempotent (a second ``apply`` only updates the settings), reversible with ``remove()``.

In a Megatron-LM ``pretrain_gpt.py``::

    from ntl_deepspeed.patches import megatron_core as ntl
    pretrain(..., extra_args_provider=ntl.add_ntl_args)   # --ntl-weight, --ntl-tokenizer, ...
    ntl.apply_from_args(get_args())                       # once args are parsed
    loss_func = ntl.wrap_loss_func(loss_func)              # logs 'ntl' as [sum, count]
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable, Optional

import torch

from ntl_deepspeed import NTLConfig, NumberVocab, vocab_parallel_ce_ntl

TARGET = "megatron.core.models.common.language_module.language_module.LanguageModule" \
         ".compute_language_model_loss"
_MARK = "__ntl_deepspeed_patch__"


@dataclasses.dataclass
class _State:
    vocab: NumberVocab
    config: NTLConfig
    include_mtp: bool
    last_ntl: Optional[torch.Tensor] = None    # per-token NTL [b, s] of the last main-head call
    last_mask: Optional[torch.Tensor] = None   # where that NTL applies [b, s]


_state: Optional[_State] = None


def _language_module():
    try:
        from megatron.core.models.common.language_module.language_module import LanguageModule
    except ImportError as e:
        raise ImportError(f"ntl_deepspeed.patches.megatron_core needs megatron-core with {TARGET}"
                          f" ({e})") from None
    fn = getattr(LanguageModule, "compute_language_model_loss", None)
    if fn is None:
        raise AttributeError(f"the installed megatron-core has no {TARGET}; supported: 0.16.x")
    return LanguageModule


def _tp_group(module, kwargs):
    group = kwargs.get("tp_group")
    if group is None:
        pg = getattr(module, "pg_collection", None)
        group = getattr(pg, "tp", None)
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    return group if torch.distributed.get_world_size(group) > 1 else None


def _called_from_mtp(logits) -> bool:
    """GPTModel's MTP loop calls the same method with its local ``mtp_logits``. (The loop
    variable ``mtp_layer_number`` stays in the frame after the loop, so it cannot tell the
    main head's later call apart.)"""
    return sys._getframe(2).f_locals.get("mtp_logits") is logits


def _patched(self, labels, logits, *args, **kwargs):
    state, original = _state, _original()
    from_mtp = _called_from_mtp(logits)
    if state is None or not state.config.enabled or (from_mtp and not state.include_mtp):
        return original(self, labels, logits, *args, **kwargs)
    tp_group = _tp_group(self, kwargs)
    out = vocab_parallel_ce_ntl(logits, labels.transpose(0, 1).contiguous(), state.vocab,
                                tp_group, state.config, reduction="none")
    if not from_mtp:
        state.last_ntl = out.ntl.detach().transpose(0, 1)
        state.last_mask = out.number_label_mask.transpose(0, 1)
    return out.loss.transpose(0, 1).contiguous()


def _original():
    return getattr(_language_module().compute_language_model_loss, "__wrapped__")


def apply(vocab: NumberVocab, config: Optional[NTLConfig] = None, include_mtp: bool = False):
    """Patch (or update the patch of) ``LanguageModule.compute_language_model_loss``."""
    global _state
    cls = _language_module()
    _state = _State(vocab, config or NTLConfig(), include_mtp)
    current = cls.compute_language_model_loss
    if getattr(current, _MARK, False):
        return
    wrapper = _patched
    wrapper.__wrapped__ = current
    setattr(wrapper, _MARK, True)
    cls.compute_language_model_loss = wrapper


def remove() -> None:
    """Restore Megatron's own method (no-op when not patched)."""
    global _state
    cls = _language_module()
    current = cls.compute_language_model_loss
    if getattr(current, _MARK, False):
        cls.compute_language_model_loss = current.__wrapped__
    _state = None


def is_applied() -> bool:
    return getattr(_language_module().compute_language_model_loss, _MARK, False)


# ---------------------------------------------------------------------- Megatron-LM glue
def add_ntl_args(parser):
    """``extra_args_provider`` for Megatron-LM's ``pretrain``."""
    g = parser.add_argument_group("number token loss (ntl-deepspeed)")
    g.add_argument("--ntl-weight", type=float, default=0.3, help="lambda in CE + lambda*NTL")
    g.add_argument("--ntl-kind", default="was", choices=["was", "mse", "l1", "huber",
                                                         "number_level"])
    g.add_argument("--ntl-tokenizer", default=None,
                   help="tokenizer file/dir for the number vocab (default: --tokenizer-model)")
    g.add_argument("--ntl-mode", default="digits", choices=["digits", "integers", "floats"])
    g.add_argument("--ntl-reweigh", action="store_true")
    g.add_argument("--ntl-squash-factor", type=float, default=None)
    g.add_argument("--ntl-include-mtp", action="store_true", help="NTL on MTP heads too")
    g.add_argument("--ntl-disable", action="store_true")
    return parser


def apply_from_args(args) -> NumberVocab:
    tokenizer = args.ntl_tokenizer or getattr(args, "tokenizer_model", None)
    if tokenizer is None:
        raise ValueError("NTL needs --ntl-tokenizer (or --tokenizer-model) for its number vocab")
    vocab = NumberVocab.from_tokenizer(tokenizer, mode=args.ntl_mode,
                                       vocab_size=getattr(args, "padded_vocab_size", None))
    apply(vocab, NTLConfig(kind=args.ntl_kind, weight=args.ntl_weight, reweigh=args.ntl_reweigh,
                           squash_factor=args.ntl_squash_factor, enabled=not args.ntl_disable),
          include_mtp=args.ntl_include_mtp)
    return vocab


def report_entry(loss_mask: torch.Tensor) -> Optional[torch.Tensor]:
    """``[masked NTL sum, masked number-label count]`` of the last forward (main head), the form
    Megatron-LM's training loop sums over microbatches and DP ranks and then divides."""
    if _state is None or _state.last_ntl is None:
        return None
    ntl = _state.last_ntl
    mask = loss_mask.reshape(ntl.shape).to(ntl.dtype) * _state.last_mask.to(ntl.dtype)
    return torch.stack([(ntl * mask).sum(), mask.sum()])


def wrap_loss_func(loss_func: Callable) -> Callable:
    """Add an ``'ntl'`` report entry to what a ``pretrain_gpt.py`` ``loss_func`` returns."""

    def wrapped(loss_mask, output_tensor, *args, **kwargs):
        result = loss_func(loss_mask, output_tensor, *args, **kwargs)
        entry = report_entry(loss_mask)
        if entry is not None and isinstance(result, tuple) and isinstance(result[-1], dict):
            result[-1]["ntl"] = entry
        return result

    wrapped.__wrapped__ = loss_func
    return wrapped
