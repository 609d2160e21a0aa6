"""Megatron-core: CE + lambda*NTL from the vocab-parallel logits (or the hidden states), by
runtime patches on megatron-core 0.16 to 0.19 (feature-detected: :mod:`.megatron_compat`).

``apply(vocab, config)`` wraps, with the one patch helper (:mod:`._patching`: original kept in
the wrapper's closure, stacking-safe in either order, idempotent, reversible):

- ``LanguageModule.compute_language_model_loss`` (GPT, Hybrid/Mamba, T5, BERT and the MTP heads
  all call it, only where ``post_process`` holds). It computes CE *and* NTL with :func:`ce_ntl`
  on the ``[s, b, V/tp]`` logits -- replacing Megatron's CE, which overwrites fp32 logits in
  place -- and returns the per-token ``ce + lambda * ntl`` as ``[b, s]``, so loss masks,
  per-token-loss mode, context parallelism and microbatch scaling work unchanged. The NTL of a
  token-level loss is thus normalised like the CE (by the masked token count);
  ``config.normalization`` does not apply here.
- each model's post-processing scope -- ``GPTModel._postprocess`` and, where it exists (0.19),
  ``HybridModel.forward`` (its output layer, MTP and loss calls are inline) -- to know which loss
  call is the main head's (see :class:`_Scope`) and, with ``config.fused_head``, to let the main
  head's output layer compute the loss from the hidden states without any logits;
- ``process_mtp_loss`` as the model modules call it (0.17+), to know which output-layer calls
  are MTP heads' (they keep their logits: 0.19 reads them again after the loss).

A second ``apply`` only updates the settings; ``remove()`` restores Megatron's functions (or, if
another plugin has wrapped on top of ours, turns ours into a pass-through). The alternative on
megatron-core >= 0.18 without any patch: :class:`.megatron_output_processor.NTLOutputProcessor`.

In a Megatron-LM ``pretrain_gpt.py`` / ``pretrain_hybrid.py``::

    from ntl_deepspeed.patches import megatron_core as ntl
    pretrain(..., extra_args_provider=ntl.add_ntl_args)   # every --ntl-* option of NTLConfig
    ntl.apply_from_args(get_args())                       # once args are parsed
    loss_func = ntl.wrap_loss_func(loss_func)              # logs 'ntl' as [sum, count]
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, List, Optional, Tuple

import torch

from ntl_deepspeed import NTLConfig, NumberVocab
from ntl_deepspeed.config import add_arguments, as_config, from_arguments

from . import megatron_compat as compat
from . import megatron_heads as heads
from ._patching import Patch, Slot

TARGET = compat.LOSS
POSTPROCESS_TARGET = compat.GPT_POSTPROCESS
SUPPORTED = compat.SUPPORTED
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

    __slots__ = ("standin", "layer", "forward", "input_", "weight", "runtime_gather_output",
                 "scale")

    def __init__(self, standin, layer, forward, input_, weight, runtime_gather_output):
        self.standin, self.layer, self.forward = standin, layer, forward
        self.input_, self.weight = input_, weight
        self.runtime_gather_output = runtime_gather_output
        self.scale = 1.0  # Megatron's logit scaling (MuP), once _scale_logits saw the stand-in

    def logits(self) -> torch.Tensor:
        """The logits after all, from the layer's own forward (0.16's inline MTP heads)."""
        logits = self.forward(self.input_, weight=self.weight,
                              runtime_gather_output=self.runtime_gather_output)[0]
        return logits if self.scale == 1.0 else logits * self.scale


class _Scope:
    """One model's post-processing in flight (``GPTModel._postprocess`` or
    ``HybridModel.forward``).

    How its loss calls are told apart: the main head's loss is computed against the ``labels``
    the model was given -- the very tensor the scope receives as its ``labels`` argument --
    while every MTP head computes its loss against labels shifted by one more position
    (``labels.clone()`` then ``roll_tensor``, 0.16 to 0.19; labels derived from ``input_ids``
    when none are given), which therefore can never be that same tensor object. So ``labels is
    scope.labels`` marks the main head. This reads only the public ``labels`` parameters -- no
    caller frames or local variable names, no count of output-layer calls -- and holds with
    other wrappers stacked on these methods as long as they pass the labels through. Should a
    future Megatron hand the main head a copy, no call would match: the scope then raises
    instead of silently dropping the NTL (``main_seen``).

    The fused head needs the decision at the output layer, which does not see the labels. Calls
    inside ``process_mtp_loss`` (0.17+: ``in_mtp``) are MTP heads and run the layer's own
    forward. Every other call returns an empty stand-in and records its inputs
    (:class:`_Pending`); ``_scale_logits`` (MuP) passes the stand-in through and records its
    constant factor; the loss call that receives the stand-in decides -- the main head's
    computes CE + NTL from the recorded hidden states (no logits), an MTP head's (0.16, inline
    MTP) computes its logits from them with the layer's own forward. If the main head's loss
    ever receives real logits in a fused scope, that is refused (no silent fallback)."""

    __slots__ = ("model", "labels", "settings", "fused", "pending", "in_mtp", "main_seen",
                 "fused_done")

    def __init__(self, model, labels, settings: Settings, fused: bool):
        self.model, self.labels, self.settings, self.fused = model, labels, settings, fused
        self.pending: List[_Pending] = []
        self.in_mtp = 0
        self.main_seen = self.fused_done = False

    def find(self, logits) -> Optional[_Pending]:
        return next((p for p in self.pending if p.standin is logits), None)

    def take(self, logits) -> Optional[_Pending]:
        pending = self.find(logits)
        if pending is not None:
            self.pending.remove(pending)
        return pending


def _tp_group(module, kwargs):
    """The model's tensor-parallel group (None when of size 1)."""
    group = kwargs.get("tp_group")
    if group is None:
        group = getattr(getattr(module, "pg_collection", None), "tp", None)
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    return group if torch.distributed.get_world_size(group) > 1 else None


class MegatronNTL:
    """The patches and everything they share at call time: the :class:`Settings`, the scopes
    in flight and the last main-head NTL (for :meth:`report_entry`). The module functions use
    one instance."""

    def __init__(self):
        self.settings: Optional[Settings] = None
        self._scopes: List[_Scope] = []
        self._last: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._loss_patch = Patch(self._loss_wrapper)
        self._scope_patches: dict = {}  # dotted name -> Patch
        self._mtp_patches: dict = {}    # module name -> Patch

    # ------------------------------------------------------------------ install
    def apply(self, vocab: NumberVocab, config: Optional[NTLConfig] = None,
              include_mtp: bool = False) -> None:
        megatron = compat.detect()
        config = config or NTLConfig()
        if config.normalization != NTLConfig().normalization:
            warnings.warn(f"ntl.normalization={config.normalization!r} is not used by the "
                          "Megatron patch: Megatron normalises the per-token loss itself (NTL "
                          "per masked token, like its CE)", stacklevel=3)
        self.settings = Settings(vocab, config, bool(include_mtp))
        for owner, name, target in megatron.scopes:
            patch = self._scope_patches.get(target)
            if patch is None:
                patch = self._scope_patches[target] = Patch(
                    lambda original, target=target: self._scope_wrapper(original, target))
            patch.install(Slot(owner, name))
        for module in megatron.mtp_modules:
            patch = self._mtp_patches.setdefault(module.__name__, Patch(self._mtp_wrapper))
            patch.install(Slot(module, "process_mtp_loss"))
        self._loss_patch.install(Slot(megatron.language_module, "compute_language_model_loss"))

    def remove(self) -> None:
        self._loss_patch.remove()
        for patch in (*self._scope_patches.values(), *self._mtp_patches.values()):
            patch.remove()
        self.settings, self._last = None, None

    @property
    def applied(self) -> bool:
        return self._loss_patch.applied and bool(self._scope_patches) and all(
            p.applied for p in (*self._scope_patches.values(), *self._mtp_patches.values()))

    # ------------------------------------------------------------------ the wrappers
    def _loss_wrapper(self, original: Callable) -> Callable:
        def compute_language_model_loss(model, labels, logits, *args, **kwargs):
            return self._loss(original, model, labels, logits, args, kwargs)

        return compute_language_model_loss

    def _scope_wrapper(self, original: Callable, target: str) -> Callable:
        signature = compat.require_parameters(original, target, "labels")

        def scoped(model, *args, **kwargs):
            arguments = signature.bind(model, *args, **kwargs).arguments
            return self._scope(original, target, model, arguments, args, kwargs)

        return scoped

    def _mtp_wrapper(self, original: Callable) -> Callable:
        signature = compat.require_parameters(original, compat.MTP_LOSS, "output_layer")

        def process_mtp_loss(*args, **kwargs):
            layer = signature.bind(*args, **kwargs).arguments.get("output_layer")
            scope = next((s for s in reversed(self._scopes)
                          if getattr(s.model, "output_layer", None) is layer), None)
            if scope is None:
                return original(*args, **kwargs)
            scope.in_mtp += 1
            try:
                return original(*args, **kwargs)
            finally:
                scope.in_mtp -= 1

        return process_mtp_loss

    def _loss(self, original, model, labels, logits, args, kwargs):
        scope = next((s for s in reversed(self._scopes) if s.model is model), None)
        settings = scope.settings if scope is not None else self.settings
        # outside a scope (T5, BERT, pre-0.19 Mamba): the main head
        main = scope is None or (scope.labels is not None and labels is scope.labels)
        if scope is not None and main:
            scope.main_seen = True
        pending = scope.take(logits) if scope is not None else None
        if pending is not None:
            if main:
                scope.fused_done = True
                return self._fused_main_loss(pending, labels, settings)
            logits = pending.logits()  # an inline (0.16) MTP head's: its logits after all
        elif main and scope is not None and scope.fused:
            raise RuntimeError("ntl fused_head: the main head's compute_language_model_loss "
                               "received other logits than the fused head's stand-in (something "
                               "computed or transformed the output layer's result: a forward "
                               "hook, a logit transformation; megatron-core "
                               f"{compat.installed_version()}; "
                               f"supported: {SUPPORTED}); refusing to fall back silently -- "
                               "run without fused_head")
        if settings is None or not settings.config.enabled or \
                (not main and not settings.include_mtp):
            return original(model, labels, logits, *args, **kwargs)
        out = heads.logits_loss(settings.vocab, settings.config, labels, logits,
                                _tp_group(model, kwargs))
        if main:
            self._record(out)
        return heads.per_token(out)

    def _scope(self, original, target, model, arguments, args, kwargs):
        settings = self.settings
        if settings is None or not settings.config.enabled:
            return original(model, *args, **kwargs)
        labels = arguments.get("labels")
        post_process = getattr(model, "post_process", True)
        processor = arguments.get("output_processor")  # 0.18+: the caller's hook owns the head
        inference = arguments.get("inference_context") is not None or \
            arguments.get("inference_params") is not None
        fused = bool(settings.config.fused_head and labels is not None and post_process
                     and processor is None and not inference)
        scope = _Scope(model, labels, settings, fused)
        overrides: List[Patch] = []
        self._scopes.append(scope)
        try:
            if fused:
                self._install_fused(scope, overrides)
            result = original(model, *args, **kwargs)
        finally:
            self._scopes.remove(scope)
            for patch in reversed(overrides):
                patch.remove()
        if labels is None or not post_process or processor is not None:
            return result
        version = compat.installed_version()
        if scope.pending:
            raise RuntimeError(f"ntl fused_head: {target} did not pass the output layer's "
                               "result to compute_language_model_loss (megatron-core "
                               f"{version}; supported: {SUPPORTED}); run without fused_head")
        if not scope.main_seen and self._loss_patch.applied:
            raise RuntimeError(f"ntl: no compute_language_model_loss call of {target} received "
                               "the model's labels, so the main head could not be told from the "
                               f"MTP heads and got no NTL (megatron-core {version}; supported: "
                               f"{SUPPORTED})")
        if fused and not scope.fused_done and self._loss_patch.applied:
            raise RuntimeError(f"ntl fused_head: the main head of {target} was not computed by "
                               f"the fused head (megatron-core {version}; supported: "
                               f"{SUPPORTED}); run without fused_head")
        return result

    # ------------------------------------------------------------------ fused head
    def _install_fused(self, scope: _Scope, overrides: List[Patch]) -> None:
        """Per-call instance overrides of the output layer's ``forward`` and the model's
        ``_scale_logits`` (0.17+), removed when the scope ends (see :class:`_Scope`)."""
        model = scope.model
        head = model.output_layer
        if getattr(head.config, "defer_embedding_wgrad_compute", False):
            raise ValueError("ntl fused_head does not support defer_embedding_wgrad_compute")
        overrides.append(Patch(lambda forward: self._standin_forward(scope, head, forward)))
        overrides[-1].install(Slot(head, "forward"))
        if hasattr(model, "_scale_logits"):
            overrides.append(Patch(lambda scale: self._standin_scale(scope, scale)))
            overrides[-1].install(Slot(model, "_scale_logits"))

    @staticmethod
    def _standin_forward(scope: _Scope, layer, forward: Callable) -> Callable:
        def stand_in(input_, weight=None, runtime_gather_output=None):
            if scope.in_mtp:  # an MTP head (0.17+): real logits, Megatron reads them again
                return forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
            standin = input_.new_empty(0)
            scope.pending.append(_Pending(standin, layer, forward, input_, weight,
                                          runtime_gather_output))
            return standin, None

        return stand_in

    @staticmethod
    def _standin_scale(scope: _Scope, scale_logits: Callable) -> Callable:
        def scale(logits):
            pending = scope.find(logits)
            if pending is None:
                return scale_logits(logits)
            pending.scale *= heads.constant_scale(scale_logits, "LanguageModule._scale_logits")
            return logits

        return scale

    def _fused_main_loss(self, pending: _Pending, labels, settings: Settings):
        out = heads.fused_loss(settings.vocab, settings.config, labels, pending.input_,
                               pending.layer, pending.weight, pending.scale)
        self._record(out)
        return heads.per_token(out)

    # ------------------------------------------------------------------ reporting
    def _record(self, out) -> None:
        self._last = heads.ntl_record(out)

    def report_entry(self, loss_mask: torch.Tensor) -> Optional[torch.Tensor]:
        return heads.report_entry(self._last, loss_mask)


_ntl = MegatronNTL()


def apply(vocab: NumberVocab, config: Optional[NTLConfig] = None,
          include_mtp: bool = False) -> None:
    """Patch (or update the settings of the patch of) both methods; see the module docstring.
    ``config.fused_head`` / ``fused_block_size`` / ``fused_token_chunk`` choose the fused head
    (the 0.2 keywords ``fused_head=`` / ``block_size=`` / ``token_chunk=`` were removed in 0.3)."""
    _ntl.apply(vocab, as_config(config), include_mtp)


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
