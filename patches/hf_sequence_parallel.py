"""HF ``Trainer``'s loss under Ulysses sequence parallelism, for models that carry NTL.

With ``ParallelismConfig(sp_backend="deepspeed")`` the ``Trainer`` computes the training loss
with ``deepspeed_sp_compute_loss``: it all-gathers every SP rank's loss and re-weights each by
that rank's share of the valid tokens. Our loss already is the whole micro-batch's loss on every
SP rank, and back-propagates only this rank's share (docs/API_CONTRACT.md, "Normalisation across
layouts"); re-weighted, each rank's gradient would be scaled by ``sp_size x`` its token share --
wrong whenever the slices hold different numbers of labelled tokens (prompts, padding).

:func:`register` (called by ``install`` under SP) replaces that function where the ``Trainer``
looks it up (``transformers.trainer``) by :func:`sequence_parallel_loss` for the registered
models; every other model still gets transformers' function. Idempotent; ``__wrapped__`` kept.
"""
from __future__ import annotations

import weakref

from ._patching import Patch, Slot

_SLOT_NAME = "deepspeed_sp_compute_loss"
_models: "weakref.WeakSet" = weakref.WeakSet()


def sequence_parallel_loss(model, inputs: dict, return_outputs: bool):
    """The model's own loss (already the whole micro-batch's on every SP rank). DeepSpeed's SP
    data adapter hands pre-shifted ``shift_labels`` and drops ``labels``."""
    if "labels" not in inputs and "shift_labels" in inputs:
        inputs = {**inputs, "labels": inputs["shift_labels"]}
    outputs = model(**inputs)
    return (outputs.loss, outputs) if return_outputs else outputs.loss


def _unwrapped(model):
    for _ in range(8):  # DeepSpeed engine / accelerate / DDP wrappers hold the model as .module
        inner = getattr(model, "module", None)
        if inner is None:
            return model
        model = inner
    return model


def _make_wrapper(original):
    def compute_loss(accelerator, model, inputs, return_outputs, *args, **kwargs):
        if _unwrapped(model) in _models:
            return sequence_parallel_loss(model, inputs, return_outputs)
        return original(accelerator, model, inputs, return_outputs, *args, **kwargs)

    return compute_loss


_patch = Patch(_make_wrapper)


def register(model) -> None:
    """Route the ``Trainer``'s SP loss of ``model`` (unwrapped) through
    :func:`sequence_parallel_loss`. A transformers without ``deepspeed_sp_compute_loss`` has no
    Trainer SP path to correct: nothing to do."""
    import transformers.trainer as hf_trainer

    if not hasattr(hf_trainer, _SLOT_NAME):
        return
    _models.add(_unwrapped(model))
    _patch.install(Slot(hf_trainer, _SLOT_NAME))


def unregister(model) -> None:
    _models.discard(_unwrapped(model))
    if not len(_models):
        _patch.remove()
