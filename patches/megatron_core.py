"""Megatron-core: CE + lambda*NTL from the vocab-parallel logits, by two runtime patches.

``apply(vocab, config)`` wraps, with the one patch helper (:mod:`._patching`: original kept in
the wrapper's closure, stacking-safe in either order, idempotent, reversible):

- ``LanguageModule.compute_language_model_loss`` (GPT, Mamba, T5, BERT and the MTP heads all
  call it, only where ``post_process`` holds). It computes CE *and* NTL with :func:`ce_ntl` on
  the ``[s, b, V/tp]`` logits -- replacing Megatron's CE, which overwrites fp32 logits in place
  -- and returns the per-token ``ce + lambda * ntl`` as ``[b, s]``, so loss masks, per-token-loss
  mode, context parallelism and microbatch scaling work unchanged. The NTL of a token-level loss
  is thus normalised like the CE (by the masked token count); ``config.normalization`` does not
  apply here.
- ``GPTModel._postprocess``, to know which of its loss calls is the main head's (the MTP heads
  call the same method; see :class:`_Call`) and, with ``config.fused_head``, to let the main
  head's output layer compute the loss from the hidden states without any ``[s, b, V/tp]``
  logits.

A second ``apply`` only updates the settings; ``remove()`` restores Megatron's methods (or, if
another plugin has wrapped on top of ours, turns ours into a pass-through).

In a Megatron-LM ``pretrain_gpt.py``::

    from ntl_deepspeed.patches import megatron_core as ntl
    pretrain(..., extra_args_provider=ntl.add_ntl_args)   # every --ntl-* option of NTLConfig
    ntl.apply_from_args(get_args())                       # once args are parsed
    loss_func = ntl.wrap_loss_func(loss_func)              # logs 'ntl' as [sum, count]
"""
from __future__ import annotations

import dataclasses
import inspect
import warnings
from typing import Callable, List, Optional, Tuple

import torch

from ntl_deepspeed import NTLConfig, NumberVocab, ce_ntl
from ntl_deepspeed.config import add_arguments, as_config, from_arguments

from ._patching import Patch, Slot, require

TARGET = "megatron.core.models.common.language_module.language_module.LanguageModule" \
         ".compute_language_model_loss"
POSTPROCESS_TARGET = "megatron.core.models.gpt.gpt_model.GPTModel._postprocess"
SUPPORTED = "megatron-core 0.16.x"
# NTLConfig fields without a meaning here: Megatron-LM reports its own metrics (we add 'ntl'
# through wrap_loss_func), and Megatron normalises the per-token loss itself (by the masked
# token count, like its CE), so `normalization` cannot apply.
EXCLUDED_OPTIONS = ("log_metrics", "normalization")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the patched methods do; replaced as a whole by every ``apply``."""

    vocab: NumberVocab
    config: NTLConfig
    include_mtp: bool = False


class _Pending:
    """A fused-head output-layer call whose logits were not computed (yet)."""

    __slots__ = ("standin", "layer", "forward", "input_", "weight", "runtime_gather_output")

    def __init__(self, standin, layer, forward, input_, weight, runtime_gather_output):
        self.standin, self.layer, self.forward = standin, layer, forward
        self.input_, self.weight = input_, weight
        self.runtime_gather_output = runtime_gather_output

    def logits(self) -> torch.Tensor:
        """The logits after all, from the layer's own forward (an MTP head's)."""
        return self.forward(self.input_, weight=self.weight,
                            runtime_gather_output=self.runtime_gather_output)[0]


class _Call:
    """One ``GPTModel._postprocess`` call with labels, in flight.

    How its loss calls are told apart: the main head's loss is computed against the ``labels``
    the model was given -- the very tensor ``_postprocess`` receives as its ``labels``
    argument -- while every MTP head computes its loss against labels shifted by one more
    position (megatron-core 0.16: ``mtp_labels = labels.clone()`` then ``roll_tensor``), which
    therefore can never be that same tensor object. So ``labels is call.labels`` marks the main
    head. This reads only the public parameter ``labels`` of ``_postprocess`` and of
    ``compute_language_model_loss`` -- no caller frames or local variable names, no count of
    output-layer calls nor assumption on their order -- and it holds with other wrappers stacked
    on either method as long as they pass the labels through. Should a future Megatron hand the
    main head a copy, no call would match: ``_postprocess`` then raises instead of silently
    dropping the NTL (``main_seen``).

    The fused head needs the same decision at the output layer, which does not see the labels:
    there each call returns an empty stand-in and records its inputs (:class:`_Pending`); the
    loss call that receives the stand-in decides -- the main head's computes CE + NTL from the
    recorded hidden states (no logits), an MTP head's computes its logits from them with the
    layer's own forward and goes on as without the fused head."""

    __slots__ = ("model", "labels", "settings", "pending", "main_seen")

    def __init__(self, model, labels, settings: Settings):
        self.model, self.labels, self.settings = model, labels, settings
        self.pending: List[_Pending] = []
        self.main_seen = False

    def take(self, logits) -> Optional[_Pending]:
        for i, p in enumerate(self.pending):
            if p.standin is logits:
                return self.pending.pop(i)
        return None


def _megatron_classes():
    """(LanguageModule, GPTModel), or an error naming the symbol that is missing."""
    try:
        from megatron.core.models.common.language_module.language_module import LanguageModule
        from megatron.core.models.gpt.gpt_model import GPTModel
    except ImportError as e:
        raise ImportError(f"ntl_deepspeed.patches.megatron_core needs megatron-core with {TARGET}"
                          f" and {POSTPROCESS_TARGET} ({SUPPORTED}): {e}") from None
    require(LanguageModule, "compute_language_model_loss", TARGET, SUPPORTED)
    require(GPTModel, "_postprocess", POSTPROCESS_TARGET, SUPPORTED)
    return LanguageModule, GPTModel


def _tp_group(module, kwargs):
    """The model's tensor-parallel group (None when of size 1)."""
    group = kwargs.get("tp_group")
    if group is None:
        group = getattr(getattr(module, "pg_collection", None), "tp", None)
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    return group if torch.distributed.get_world_size(group) > 1 else None


def _shard(vocab: NumberVocab, width: int, group, device):
    """This rank's VocabShard: Megatron's vocab-parallel layout (rank r holds columns
    ``[r * width, (r + 1) * width)``, as its own ``vocab_parallel_cross_entropy`` assumes)."""
    start = None if group is None else torch.distributed.get_rank(group) * width
    return vocab.shard_for(width, group, start=start, device=device)


class MegatronNTL:
    """The two patches and everything they share at call time: the :class:`Settings`, the
    ``_postprocess`` calls in flight and the last main-head NTL (for :meth:`report_entry`).
    The module functions use one instance."""

    def __init__(self):
        self.settings: Optional[Settings] = None
        self._calls: List[_Call] = []
        self._last: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._loss_patch = Patch(self._loss_wrapper)
        self._postprocess_patch = Patch(self._postprocess_wrapper)

    # ------------------------------------------------------------------ install
    def apply(self, vocab: NumberVocab, config: Optional[NTLConfig] = None,
              include_mtp: bool = False) -> None:
        language_module, gpt_model = _megatron_classes()
        config = config or NTLConfig()
        if config.normalization != NTLConfig().normalization:
            warnings.warn(f"ntl.normalization={config.normalization!r} is not used by the "
                          "Megatron patch: Megatron normalises the per-token loss itself (NTL "
                          "per masked token, like its CE)", stacklevel=3)
        self.settings = Settings(vocab, config, bool(include_mtp))
        self._postprocess_patch.install(Slot(gpt_model, "_postprocess"))
        self._loss_patch.install(Slot(language_module, "compute_language_model_loss"))

    def remove(self) -> None:
        self._loss_patch.remove()
        self._postprocess_patch.remove()
        self.settings, self._last = None, None

    @property
    def applied(self) -> bool:
        return self._loss_patch.applied and self._postprocess_patch.applied

    # ------------------------------------------------------------------ the wrappers
    def _loss_wrapper(self, original: Callable) -> Callable:
        def compute_language_model_loss(model, labels, logits, *args, **kwargs):
            return self._loss(original, model, labels, logits, args, kwargs)

        return compute_language_model_loss

    def _postprocess_wrapper(self, original: Callable) -> Callable:
        signature = inspect.signature(original)  # Megatron's, through any functools.wraps
        if "labels" not in signature.parameters:
            raise AttributeError(f"{POSTPROCESS_TARGET} has no 'labels' parameter; "
                                 f"ntl-deepspeed supports {SUPPORTED}")

        def _postprocess(model, *args, **kwargs):
            arguments = signature.bind(model, *args, **kwargs).arguments
            return self._postprocess(original, model, arguments, args, kwargs)

        return _postprocess

    def _loss(self, original, model, labels, logits, args, kwargs):
        call = next((c for c in reversed(self._calls) if c.model is model), None)
        settings = call.settings if call is not None else self.settings
        main = call is None or labels is call.labels  # outside GPTModel (Mamba, T5...): main
        if call is not None and main:
            call.main_seen = True
        pending = call.take(logits) if call is not None else None
        if pending is not None:
            if main:
                return self._fused_main_loss(pending, labels, settings)
            logits = pending.logits()  # an MTP head's: its logits after all
        if settings is None or not settings.config.enabled or \
                (not main and not settings.include_mtp):
            return original(model, labels, logits, *args, **kwargs)
        group = _tp_group(model, kwargs)
        out = ce_ntl(labels.transpose(0, 1).contiguous(),
                     _shard(settings.vocab, logits.shape[-1], group, logits.device),
                     settings.config, logits=logits, reduction="none")
        if main:
            self._record(out)
        return out.loss.transpose(0, 1).contiguous()

    def _postprocess(self, original, model, arguments, args, kwargs):
        settings, labels = self.settings, arguments.get("labels")
        if settings is None or not settings.config.enabled or labels is None:
            return original(model, *args, **kwargs)
        call = _Call(model, labels, settings)
        head_patch = None
        inference = arguments.get("inference_context") is not None or \
            arguments.get("inference_params") is not None
        if settings.config.fused_head and not inference and getattr(model, "post_process", True):
            head = model.output_layer
            if getattr(head.config, "defer_embedding_wgrad_compute", False):
                raise ValueError("ntl fused_head does not support defer_embedding_wgrad_compute")
            head_patch = Patch(lambda forward: self._standin_forward(call, head, forward))
            head_patch.install(Slot(head, "forward"))
        self._calls.append(call)
        try:
            result = original(model, *args, **kwargs)
        finally:
            self._calls.remove(call)
            if head_patch is not None:
                head_patch.remove()
        if call.pending:
            raise RuntimeError(f"ntl fused_head: {POSTPROCESS_TARGET} did not pass the output "
                               "layer's result to compute_language_model_loss (supported: "
                               f"{SUPPORTED}); run without fused_head")
        if not call.main_seen and self._loss_patch.applied and getattr(model, "post_process",
                                                                        True):
            raise RuntimeError(f"ntl: no compute_language_model_loss call of {POSTPROCESS_TARGET} "
                               "received the model's labels, so the main head could not be told "
                               f"from the MTP heads and got no NTL (supported: {SUPPORTED})")
        return result

    # ------------------------------------------------------------------ fused head
    @staticmethod
    def _standin_forward(call: _Call, layer, forward: Callable) -> Callable:
        """The output layer's ``forward`` during a fused ``_postprocess``: records its inputs and
        returns an empty stand-in instead of logits (see :class:`_Call`)."""

        def stand_in(input_, weight=None, runtime_gather_output=None):
            standin = input_.new_empty(0)
            call.pending.append(_Pending(standin, layer, forward, input_, weight,
                                         runtime_gather_output))
            return standin, None

        return stand_in

    def _fused_main_loss(self, pending: _Pending, labels, settings: Settings):
        """The main head's per-token loss ``[b, s]`` from its hidden states, taken through
        Megatron's own TP region op so that their gradient is reduced as the layer's would be."""
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region)

        layer = pending.layer
        group = layer.tp_group
        tp = torch.distributed.get_world_size(group)
        hidden = pending.input_
        if layer.sequence_parallel and tp > 1:  # [s/tp, b, h] -> [s, b, h]; bwd reduce-scatter
            hidden = gather_from_sequence_parallel_region(hidden, True, group=group)
        elif tp > 1:  # identity; backward all-reduces the hidden-state gradient
            hidden = copy_to_tensor_model_parallel_region(hidden, group=group)
        weight = layer.weight if pending.weight is None else pending.weight
        out = ce_ntl(labels.transpose(0, 1).contiguous(),
                     _shard(settings.vocab, weight.shape[0], group if tp > 1 else None,
                            hidden.device),
                     settings.config, hidden=hidden, head_weight=weight,
                     head_bias=None if layer.skip_bias_add else layer.bias, reduction="none")
        self._record(out)
        return out.loss.transpose(0, 1).contiguous()

    # ------------------------------------------------------------------ reporting
    def _record(self, out) -> None:
        self._last = (out.ntl.detach().transpose(0, 1), out.number_label_mask.transpose(0, 1))

    def report_entry(self, loss_mask: torch.Tensor) -> Optional[torch.Tensor]:
        if self._last is None:
            return None
        ntl, number_mask = self._last
        mask = loss_mask.reshape(ntl.shape).to(ntl.dtype) * number_mask.to(ntl.dtype)
        return torch.stack([(ntl * mask).sum(), mask.sum()])


_ntl = MegatronNTL()


def apply(vocab: NumberVocab, config: Optional[NTLConfig] = None, include_mtp: bool = False,
          fused_head: Optional[bool] = None, block_size: Optional[int] = None,
          token_chunk: Optional[int] = None) -> None:
    """Patch (or update the settings of the patch of) both methods; see the module docstring.
    ``config.fused_head`` / ``fused_block_size`` / ``fused_token_chunk`` choose the fused head;
    the ``fused_head`` / ``block_size`` / ``token_chunk`` keywords are deprecated (0.2) aliases
    of these fields."""
    config = as_config(config)
    legacy = {"fused_head": fused_head, "fused_block_size": block_size,
              "fused_token_chunk": token_chunk}
    legacy = {k: v for k, v in legacy.items() if v is not None}
    if legacy:
        warnings.warn("megatron_core.apply(fused_head=, block_size=, token_chunk=) is deprecated "
                      "and will be removed in 0.3; set NTLConfig(fused_head=, fused_block_size=, "
                      "fused_token_chunk=)", DeprecationWarning, stacklevel=2)
        config = config.replace(**legacy)
    _ntl.apply(vocab, config, include_mtp)


def remove() -> None:
    """Restore Megatron's own methods (no-op when not patched)."""
    _ntl.remove()


def is_applied() -> bool:
    return _ntl.applied


def current_settings() -> Optional[Settings]:
    """The installed :class:`Settings` (None when not applied)."""
    return _ntl.settings


# ---------------------------------------------------------------------- Megatron-LM glue
def add_ntl_args(parser):
    """``extra_args_provider`` for Megatron-LM's ``pretrain``: one ``--ntl-*`` flag per
    :class:`NTLConfig` field (but :data:`EXCLUDED_OPTIONS`), plus ``--ntl-tokenizer``,
    ``--ntl-include-mtp`` and ``--ntl-disable`` (alias of ``--no-ntl-enabled``)."""
    group = add_arguments(parser, prefix="ntl", exclude=EXCLUDED_OPTIONS)
    group.add_argument("--ntl-tokenizer", default=None,
                       help="tokenizer file/dir for the number vocab (default: --tokenizer-model)")
    group.add_argument("--ntl-include-mtp", action="store_true",
                       help="NTL on the multi-token-prediction heads too (default: CE only)")
    group.add_argument("--ntl-disable", dest="ntl_enabled", action="store_false", default=None,
                       help="alias of --no-ntl-enabled: keep the patch, run Megatron's CE")
    return parser


def apply_from_args(args) -> NumberVocab:
    """Build the number vocab and :func:`apply` every ``--ntl-*`` option given."""
    config = from_arguments(args, prefix="ntl")
    tokenizer = getattr(args, "ntl_tokenizer", None) or getattr(args, "tokenizer_model", None)
    if tokenizer is None:
        raise ValueError("NTL needs --ntl-tokenizer (or --tokenizer-model) for its number vocab")
    vocab = NumberVocab.from_tokenizer(tokenizer, mode=config.mode,
                                       vocab_size=getattr(args, "padded_vocab_size", None))
    apply(vocab, config, include_mtp=bool(getattr(args, "ntl_include_mtp", False)))
    return vocab


def report_entry(loss_mask: torch.Tensor) -> Optional[torch.Tensor]:
    """``[masked NTL sum, masked number-label count]`` of the last forward (main head), the form
    Megatron-LM's training loop sums over microbatches and DP ranks and then divides."""
    return _ntl.report_entry(loss_mask)


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
