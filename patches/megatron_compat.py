"""What the Megatron patch needs from megatron-core, found by feature detection (0.16 to 0.19).

:func:`detect` imports the installed megatron-core and returns the :class:`Megatron` symbols the
patch wraps, or raises an error naming the installed version and the missing symbol (or the
parameter a changed signature lost). Nothing here depends on a version number: a symbol is used
when it is there and has the parameters the patch reads.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, List, Optional, Tuple

SUPPORTED = "megatron-core 0.16 to 0.19"
LOSS = "megatron.core.models.common.language_module.language_module.LanguageModule" \
       ".compute_language_model_loss"
GPT_POSTPROCESS = "megatron.core.models.gpt.gpt_model.GPTModel._postprocess"
HYBRID_FORWARD = "megatron.core.models.hybrid.hybrid_model.HybridModel.forward"
MAMBA_FORWARD = "megatron.core.models.mamba.mamba_model.MambaModel.forward"
MTP_LOSS = "megatron.core.transformer.multi_token_prediction.process_mtp_loss"


def installed_version() -> str:
    """The imported megatron-core's version (``package_info``, not pip metadata: with a second
    version on ``PYTHONPATH`` the imported one is what counts)."""
    try:
        info = importlib.import_module("megatron.core.package_info")
    except ImportError:
        return "unknown"
    return str(getattr(info, "__shortversion__", getattr(info, "__version__", "unknown")))


def _where() -> str:
    return f"installed: megatron-core {installed_version()}; supported: {SUPPORTED}"


def missing(symbol: str, detail: str = "") -> AttributeError:
    return AttributeError(f"ntl-deepspeed's Megatron patch needs {symbol}, which the installed "
                          f"megatron-core lacks{detail} ({_where()})")


def changed(symbol: str, parameter: str) -> TypeError:
    return TypeError(f"{symbol} has no parameter {parameter!r} any more; ntl-deepspeed's Megatron "
                     f"patch reads it ({_where()})")


def require_parameters(fn, symbol: str, *names: str) -> inspect.Signature:
    """``fn``'s signature (through ``functools.wraps`` wrappers), checked to have ``names``."""
    signature = inspect.signature(fn)
    for name in names:
        if name not in signature.parameters:
            raise changed(symbol, name)
    return signature


@dataclasses.dataclass(frozen=True)
class Megatron:
    """The installed megatron-core's patch points.

    ``scopes``: (class, method name, dotted name) of each model's post-processing -- the method
    whose run contains the output layer and every loss call of one forward:
    ``GPTModel._postprocess`` always; ``HybridModel.forward`` where HybridModel exists (0.18+,
    post-processing inline); ``MambaModel.forward`` where MambaModel defines its own (0.16,
    0.17: inline, with MTP in 0.17; from 0.18 it is a HybridModel subclass).
    ``mtp_modules``: the model modules whose global ``process_mtp_loss`` (0.17+) runs the MTP
    heads; empty where MTP is inline in ``_postprocess`` (0.16)."""

    version: str
    language_module: Any
    scopes: Tuple[Tuple[Any, str, str], ...]
    mtp_modules: Tuple[Any, ...]


def _import(module: str, symbol: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"ntl-deepspeed's Megatron patch needs {symbol} ({_where()}): "
                          f"{e}") from None


def detect() -> Megatron:
    lm_module = _import("megatron.core.models.common.language_module.language_module", LOSS)
    gpt_module = _import("megatron.core.models.gpt.gpt_model", GPT_POSTPROCESS)
    language_module = getattr(lm_module, "LanguageModule", None)
    if language_module is None or not hasattr(language_module, "compute_language_model_loss"):
        raise missing(LOSS)
    params = list(inspect.signature(language_module.compute_language_model_loss).parameters)
    if params[1:3] != ["labels", "logits"]:
        raise TypeError(f"{LOSS} takes {params} instead of (self, labels, logits, ...) "
                        f"({_where()})")
    gpt = getattr(gpt_module, "GPTModel", None)
    if gpt is None or not hasattr(gpt, "_postprocess"):
        raise missing(GPT_POSTPROCESS)
    require_parameters(gpt._postprocess, GPT_POSTPROCESS, "labels")
    scopes: List[Tuple[Any, str, str]] = [(gpt, "_postprocess", GPT_POSTPROCESS)]
    model_modules = [gpt_module]
    for module_name, class_name, symbol in (
            ("megatron.core.models.hybrid.hybrid_model", "HybridModel", HYBRID_FORWARD),
            ("megatron.core.models.mamba.mamba_model", "MambaModel", MAMBA_FORWARD)):
        try:
            module: Optional[Any] = importlib.import_module(module_name)
        except ImportError:  # HybridModel: before 0.18; MambaModel: needs nothing absent here
            continue
        cls = getattr(module, class_name, None)
        if cls is None:
            raise missing(symbol)
        if "forward" not in vars(cls):  # inherited (0.18+ MambaModel): its base's scope
            continue
        require_parameters(cls.forward, symbol, "labels")
        scopes.append((cls, "forward", symbol))
        model_modules.append(module)
    mtp_module = _import("megatron.core.transformer.multi_token_prediction", MTP_LOSS)
    mtp_modules: Tuple[Any, ...] = ()
    if hasattr(mtp_module, "process_mtp_loss"):  # 0.17+: MTP heads run inside it
        require_parameters(mtp_module.process_mtp_loss, MTP_LOSS, "output_layer")
        for module in model_modules:
            if not hasattr(module, "process_mtp_loss"):
                raise missing(f"{module.__name__}.process_mtp_loss",
                              f" (the model module no longer calls {MTP_LOSS} by that name)")
        mtp_modules = tuple(model_modules)
    return Megatron(installed_version(), language_module, tuple(scopes), mtp_modules)
