"""Megatron-core: CE + lambda*NTL from the vocab-parallel logits, by one runtime patch.

``apply(vocab, config)`` wraps ``LanguageModule.compute_language_model_loss`` at class level (GPT,
Mamba, T5, BERT and the MTP heads all call it, only where ``post_process`` holds). The wrapper
computes CE *and* NTL with the fused op on the ``[s, b, V/tp]`` logits -- replacing Megatron's CE,
which overwrites fp32 logits in place -- and returns the per-token ``ce + lambda * ntl`` as
``[b, s]``, so loss masks, per-token-loss mode, context parallelism and microbatch scaling work
unchanged. The NTL of a token-level loss is thus normalised like the CE (by the masked token
count). Idempotent (a second ``apply`` only updates the settings), reversible with ``remove()``.

``apply(..., fused_head=True)`` also wraps ``GPTModel._postprocess``: while it runs with labels,
the main head's output layer computes the per-token CE + NTL from the hidden states with
:func:`~ntl_deepspeed.fused_linear_ce_ntl` (no ``[s, b, V/tp]`` logits), taking the hidden
states through Megatron's own TP region op (copy / sequence-parallel gather) so their gradient
is reduced as the layer's would be. MTP heads keep materialised logits.

In a Megatron-LM ``pretrain_gpt.py``::

    from ntl_deepspeed.patches import megatron_core as ntl
    pretrain(..., extra_args_provider=ntl.add_ntl_args)   # --ntl-weight, --ntl-tokenizer, ...
    ntl.apply_from_args(get_args())                       # once args are parsed
    loss_func = ntl.wrap_loss_func(loss_func)              # logs 'ntl' as [sum, count]
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
from typing import Callable, Optional

import torch

from ntl_deepspeed import NTLConfig, NumberVocab, fused_linear_ce_ntl, vocab_parallel_ce_ntl
from ntl_deepspeed.ops.hidden import DEFAULT_BLOCK, DEFAULT_TOKEN_CHUNK

TARGET = "megatron.core.models.common.language_module.language_module.LanguageModule" \
         ".compute_language_model_loss"
FUSED_TARGET = "megatron.core.models.gpt.gpt_model.GPTModel._postprocess"
_MARK = "__ntl_deepspeed_patch__"


@dataclasses.dataclass
class _State:
    vocab: NumberVocab
    config: NTLConfig
    include_mtp: bool
    fused_head: bool = False
    block_size: int = DEFAULT_BLOCK
    token_chunk: int = DEFAULT_TOKEN_CHUNK
    fused_loss: Optional[torch.Tensor] = None  # the output layer's stand-in for the logits
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
    if state is not None and state.fused_loss is not None and logits is state.fused_loss:
        state.fused_loss = None  # the fused output layer already computed the loss, [s, b]
        return logits.transpose(0, 1).contiguous()
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


def _gpt_model():
    try:
        from megatron.core.models.gpt.gpt_model import GPTModel
    except ImportError as e:
        raise ImportError(f"fused_head=True needs {FUSED_TARGET} ({e})") from None
    if not hasattr(GPTModel, "_postprocess"):
        raise AttributeError(f"the installed megatron-core has no {FUSED_TARGET}; supported: "
                             "0.16.x")
    return GPTModel


_signature = functools.lru_cache(maxsize=None)(inspect.signature)  # asked every forward


def _fused_output_layer(layer, labels, state):
    """A ``forward`` for ``layer`` (the main head's ColumnParallelLinear) returning the per-token
    loss ``[s, b]`` in place of the logits."""
    from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                        gather_from_sequence_parallel_region)

    if getattr(layer.config, "defer_embedding_wgrad_compute", False):
        raise ValueError("fused_head=True does not support defer_embedding_wgrad_compute")

    def forward(input_, weight=None, runtime_gather_output=None):
        group = layer.tp_group
        tp = torch.distributed.get_world_size(group)
        hidden = input_
        if layer.sequence_parallel:  # [s/tp, b, h] -> [s, b, h]; backward reduce-scatters
            hidden = gather_from_sequence_parallel_region(input_, True, group=group)
        elif tp > 1:  # identity; backward all-reduces the hidden-state gradient
            hidden = copy_to_tensor_model_parallel_region(input_, group=group)
        out = fused_linear_ce_ntl(
            hidden, layer.weight if weight is None else weight, labels.transpose(0, 1),
            state.vocab, group if tp > 1 else None, state.config,
            bias=None if layer.skip_bias_add else layer.bias, block_size=state.block_size,
            token_chunk=state.token_chunk, reduction="none")
        state.last_ntl = out.ntl.detach().transpose(0, 1)
        state.last_mask = out.number_label_mask.transpose(0, 1)
        state.fused_loss = out.loss
        return out.loss, None

    return forward


def _fused_postprocess(self, *args, **kwargs):
    state, original = _state, _gpt_model()._postprocess.__wrapped__
    labels = _signature(original).bind(self, *args, **kwargs).arguments.get("labels")
    if state is None or not state.fused_head or not state.config.enabled or labels is None:
        return original(self, *args, **kwargs)
    head, main_call = self.output_layer, self.config.mtp_num_layers or 0  # MTP heads come first
    fused, calls = _fused_output_layer(head, labels, state), [0]
    class_forward = type(head).forward

    def forward(*a, **k):
        calls[0] += 1
        return fused(*a, **k) if calls[0] - 1 == main_call else class_forward(head, *a, **k)

    head.forward = forward
    try:
        return original(self, *args, **kwargs)
    finally:
        del head.forward
        state.fused_loss = None


def apply(vocab: NumberVocab, config: Optional[NTLConfig] = None, include_mtp: bool = False,
          fused_head: bool = False, block_size: int = DEFAULT_BLOCK,
          token_chunk: int = DEFAULT_TOKEN_CHUNK):
    """Patch (or update the patch of) ``LanguageModule.compute_language_model_loss``; with
    ``fused_head`` also ``GPTModel._postprocess`` (see the module docstring)."""
    global _state
    cls = _language_module()
    _state = _State(vocab, config or NTLConfig(), include_mtp, fused_head, block_size,
                    token_chunk)
    if fused_head:
        gpt = _gpt_model()
        if not getattr(gpt._postprocess, _MARK, False):
            wrapper = functools.wraps(gpt._postprocess)(_fused_postprocess)
            setattr(wrapper, _MARK, True)
            gpt._postprocess = wrapper
    current = cls.compute_language_model_loss
    if getattr(current, _MARK, False):
        return
    wrapper = _patched
    wrapper.__wrapped__ = current
    setattr(wrapper, _MARK, True)
    cls.compute_language_model_loss = wrapper


def remove() -> None:
    """Restore Megatron's own methods (no-op when not patched)."""
    global _state
    cls = _language_module()
    current = cls.compute_language_model_loss
    if getattr(current, _MARK, False):
        cls.compute_language_model_loss = current.__wrapped__
    gpt = sys.modules.get("megatron.core.models.gpt.gpt_model")
    if gpt is not None and getattr(gpt.GPTModel._postprocess, _MARK, False):
        gpt.GPTModel._postprocess = gpt.GPTModel._postprocess.__wrapped__
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
    g.add_argument("--ntl-fused-head", action="store_true",
                   help="main head computes the loss without materialising the logits")
    g.add_argument("--ntl-fused-block-size", type=int, default=DEFAULT_BLOCK)
    g.add_argument("--ntl-fused-token-chunk", type=int, default=DEFAULT_TOKEN_CHUNK)
    return parser


def apply_from_args(args) -> NumberVocab:
    tokenizer = args.ntl_tokenizer or getattr(args, "tokenizer_model", None)
    if tokenizer is None:
        raise ValueError("NTL needs --ntl-tokenizer (or --tokenizer-model) for its number vocab")
    vocab = NumberVocab.from_tokenizer(tokenizer, mode=args.ntl_mode,
                                       vocab_size=getattr(args, "padded_vocab_size", None))
    apply(vocab, NTLConfig(kind=args.ntl_kind, weight=args.ntl_weight, reweigh=args.ntl_reweigh,
                           squash_factor=args.ntl_squash_factor, enabled=not args.ntl_disable),
          include_mtp=args.ntl_include_mtp, fused_head=args.ntl_fused_head,
          block_size=args.ntl_fused_block_size, token_chunk=args.ntl_fused_token_chunk)
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
