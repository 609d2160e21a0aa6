"""DeepSpeed: the ``"ntl"`` section of a ds_config, and NTL installed on an engine.

What a user's own training script calls; our trainer (:mod:`ntl_deepspeed.train`) uses exactly
this. ``split_config`` validates and removes ``"ntl"`` before DeepSpeed sees the config
(DeepSpeed accepts unknown top-level keys silently). ``install`` puts CE + lambda*NTL on the
engine's model -- as its ``loss_function`` (materialised logits) or inside its ``lm_head``
(``fused_head``) -- with the layout DeepSpeed chose: data parallel only, or AutoTP with a
vocab-parallel head (its TP group and ``vocab_start_index``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch

from ..checks import check_vocab_argument
from ..config import NTLConfig, as_config, read_json_object
from ..loss import CENTLOutput
from ..numbers import NumberVocab
from ..parallel import group_size
from ..flops import book_into_root
from .sequence_parallel import (check_config_has_groups, check_sequence_parallel,
                                sequence_parallel_groups, zero3_partitioned)

REQUIRED_DEEPSPEED = "0.19.8"  # the vocab-parallel AutoTP head exists only there


def split_config(ds_config: Union[Dict[str, Any], str], source: Optional[str] = None
                 ) -> Tuple[Dict[str, Any], NTLConfig]:
    """(DeepSpeed's own config without ``"ntl"``, the validated NTLConfig). ``ds_config`` may be
    a dict or a JSON path; errors name the file and the key. No section: NTL disabled."""
    if isinstance(ds_config, str):
        source = source or ds_config
        ds_config = read_json_object(ds_config, source)
    if not isinstance(ds_config, dict):
        raise ValueError(f"{source or 'the DeepSpeed config'}: expected a JSON object")
    raw = ds_config.get("ntl")
    try:
        config = NTLConfig(enabled=False) if raw is None else NTLConfig.from_dict(raw)
    except ValueError as e:
        where = f" of {source}" if source else " in the DeepSpeed config"
        raise ValueError(f'invalid "ntl" section{where}: {e}') from None
    return {k: v for k, v in ds_config.items() if k != "ntl"}, config


def autotp_size(ds_config: dict) -> int:
    return int((ds_config.get("tensor_parallel") or {}).get("autotp_size", 1) or 1)


def has_vocab_parallel_head() -> bool:
    """Whether the installed DeepSpeed's AutoTP can shard the LM head along the vocab."""
    try:
        from deepspeed.module_inject import layers
    except ImportError:
        return False
    return hasattr(layers, "VocabParallelLinear")


def launched_world_size() -> int:
    """Processes in this run: the process group's size, else the launcher's WORLD_SIZE (set by
    deepspeed, torchrun and our MPI launcher before the group exists), else 1."""
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def check_autotp_world(ds_config: dict) -> None:
    """AutoTP needs its tensor-parallel ranks: refuse a world it does not divide (DeepSpeed
    itself ends in a bare AssertionError). Call it in the workers, not in a launcher."""
    size, world = autotp_size(ds_config), launched_world_size()
    if size > 1 and world % size:
        raise ValueError(f"tensor_parallel.autotp_size={size} needs a multiple of {size} "
                         f"processes, but this run has {world}: launch it with e.g. "
                         f"`deepspeed --num_gpus {size} ...` or `torchrun --nproc_per_node "
                         f"{size} ...`, or set autotp_size to 1")


def check_deepspeed_for_autotp(ds_config: dict) -> None:
    import deepspeed

    tp = ds_config.get("tensor_parallel") or {}
    if autotp_size(ds_config) > 1 and tp.get("vocab_parallel_lm_head") and \
            not has_vocab_parallel_head():
        raise RuntimeError(f"AutoTP with a vocab-parallel lm_head needs a DeepSpeed with "
                           f"VocabParallelLinear (checked: {REQUIRED_DEEPSPEED}); installed: "
                           f"{deepspeed.__version__}")


@dataclass
class Layout:
    """How the model is laid out: the vocab-parallel head's group and first id (None without
    tensor parallelism), the data-parallel group (None: one process; under sequence parallelism
    the data x sequence parallel group) and the sequence-parallel group (None: no SP)."""

    tp_group: Any
    vocab_start_index: Optional[int]
    dp_group: Any
    sp_group: Any = None


def model_layout(model) -> Layout:
    """Read from the model itself: an AutoTP vocab-parallel head carries ``mp_group`` and
    ``vocab_start_index``; DeepSpeed's groups give the DP group. Works for an engine's module
    and for a model HF ``Trainer`` wrapped."""
    import torch.distributed as dist

    head = model.get_output_embeddings()
    start = getattr(head, "vocab_start_index", None)
    sp = sequence_parallel_groups()
    if start is not None and getattr(head, "mp_group", None) is not None:
        from deepspeed.utils import groups

        return Layout(head.mp_group, int(start), groups.get_data_parallel_group(),
                      sp.sp_group if sp else None)
    if sp is not None:
        return Layout(None, None, sp.seq_dp_group, sp.sp_group)
    return Layout(None, None, dist.group.WORLD if dist.is_initialized() else None)


def _unwrap(engine_or_model):
    return getattr(engine_or_model, "module", engine_or_model)


def _raw_config(engine_or_model) -> Optional[dict]:
    config = getattr(getattr(engine_or_model, "_config", None), "_param_dict", None)
    return config if isinstance(config, dict) else None


def _model_vocab_size(model) -> int:
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if size is None:
        raise ValueError(f"{type(model).__name__} has no config.vocab_size: pass vocab=")
    return int(size)


def number_vocab(model, tokenizer, config: NTLConfig) -> NumberVocab:
    """The number vocab sized to the model's (padded) vocab."""
    if tokenizer is None:
        raise ValueError("NTL needs the tokenizer (or vocab=NumberVocab) to know the number "
                         "tokens")
    return NumberVocab.from_tokenizer(tokenizer, mode=config.mode,
                                      vocab_size=_model_vocab_size(model))


def runs_fp16(engine_or_model) -> bool:
    """A DeepSpeed engine with ``"fp16"`` enabled, or a model whose LM head is float16."""
    fp16_enabled = getattr(engine_or_model, "fp16_enabled", None)
    if callable(fp16_enabled) and fp16_enabled():
        return True
    get_head = getattr(_unwrap(engine_or_model), "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    weight = getattr(head, "weight", None)
    return weight is not None and weight.dtype == torch.float16


def check_half_precision(engine_or_model, vocab: NumberVocab, config: NTLConfig) -> None:
    """fp16 logits: refuse number vocabularies whose NTL gradients overflow float16
    (:meth:`NumberVocab.check_representable`), with the fix in the message."""
    if config.enabled and config.weight > 0 and runs_fp16(engine_or_model):
        vocab.check_representable(torch.float16, config.kind, config.weight,
                                  config.reweigh, config.squash_factor)


def check_ranks_agree(config: NTLConfig, vocab: NumberVocab, group=None) -> None:
    """Once, at setup: every rank must run the same ntl options (all of them: some decide which
    collectives run, e.g. ``normalization="global"`` adds one on the data-parallel group) and the
    same number vocabulary. One all_gather_object over ``group`` (default: all ranks); every rank
    raises the same error naming the differing fields and ranks."""
    import torch.distributed as dist

    from ..parallel import group_size

    if group_size(group if group is not None else dist.group.WORLD) == 1:
        return
    mine = {**dataclasses.asdict(config), "number vocabulary": vocab.fingerprint}
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    differing = {key: {r: theirs[key] for r, theirs in enumerate(everyone)}
                 for key in mine if len({repr(theirs[key]) for theirs in everyone}) > 1}
    if differing:
        raise ValueError("the ranks run different ntl settings: " + "; ".join(
            f"{key}: {values}" for key, values in differing.items())
            + " (per rank). Every rank must read the same \"ntl\" section and tokenizer")


def install(engine_or_model, tokenizer=None, config: Union[NTLConfig, dict, None] = None, *,
            vocab: Optional[NumberVocab] = None,
            on_output: Optional[Callable[[CENTLOutput], None]] = None):
    """CE + lambda*NTL on a model or a DeepSpeed engine built elsewhere (HF ``Trainer``, a
    user's own ``deepspeed.initialize``). ``config``: an NTLConfig, else the engine's raw ds
    config's ``"ntl"`` section (validated). Materialised loss or fused head per
    ``config.fused_head``, with the layout read from the model (AutoTP's TP group and
    ``vocab_start_index``, the DP group). Returns the installed :class:`HFLoss` (its ``.remove()``
    undoes it). The flops profiler books the op's work."""
    from ..patches import fused_head, hf_sequence_parallel, transformers as hf
    from ..patches.hf_loss import HFLoss

    if config is None:
        raw = _raw_config(engine_or_model)
        if raw is None:
            raise ValueError("install: pass config=NTLConfig(...) (no DeepSpeed config found)")
        config = split_config(raw)[1]
    config = as_config(config)
    model = _unwrap(engine_or_model)
    if vocab is not None:
        check_vocab_argument(vocab, "vocab", shard_ok=False)
    vocab = vocab or number_vocab(model, tokenizer, config)
    check_half_precision(engine_or_model, vocab, config)
    layout = model_layout(model)
    check_sequence_parallel(config, group_size(layout.sp_group),
                            vocab_parallel_head=layout.tp_group is not None)
    check_ranks_agree(config, vocab)
    loss = HFLoss(vocab, config, layout.tp_group, layout.vocab_start_index, layout.dp_group,
                  on_output if config.log_metrics else None, layout.sp_group,
                  layout.sp_group is not None and zero3_partitioned(engine_or_model))
    if config.fused_head:  # the loss runs inside lm_head, where ZeRO-3 gathers its weight
        loss.remove = fused_head.install(model, loss).remove
    else:
        hf.apply(vocab, config, model=model, tp_group=loss.tp_group,
                 vocab_start_index=loss.vocab_start_index, dp_group=loss.dp_group,
                 on_output=loss.on_output, sp_group=loss.sp_group,
                 sp_grads_averaged=loss.sp_grads_averaged)
        loss.remove = lambda: hf.remove(model)
    if layout.sp_group is not None:  # HF Trainer: no re-weighting of our SP loss
        hf_sequence_parallel.register(model)
        remove_loss = loss.remove

        def remove():
            hf_sequence_parallel.unregister(model)
            remove_loss()

        loss.remove = remove
    book_into_root(model)  # flops profiler: see flops.py
    return loss


def initialize(model, config: Union[Dict[str, Any], str], tokenizer=None, *,
               vocab: Optional[NumberVocab] = None,
               on_output: Optional[Callable[[CENTLOutput], None]] = None, **deepspeed_kwargs):
    """A drop-in for ``deepspeed.initialize`` (same return value) that reads and validates the
    config's ``"ntl"`` section, strips it before DeepSpeed sees it, and installs NTL on the
    engine (:func:`install`). ``model_parameters`` defaults to ``model.parameters()``.
    Ulysses sequence parallelism: pass ``mpu=`` (from ``register_with_transformers``) with
    ``"sequence_parallel_size"`` in the config; the SP group is found from it."""
    import deepspeed

    ds_config, ntl = split_config(config)
    if vocab is not None:  # before DeepSpeed builds the engine
        check_vocab_argument(vocab, "vocab", shard_ok=False)
    check_deepspeed_for_autotp(ds_config)
    check_config_has_groups(ds_config, deepspeed_kwargs.get("mpu"))
    check_sequence_parallel(ntl, int(ds_config.get("sequence_parallel_size", 1) or 1),
                            vocab_parallel_head=autotp_size(ds_config) > 1)
    check_autotp_world(ds_config)
    vocab = vocab or number_vocab(model, tokenizer, ntl)
    deepspeed_kwargs.setdefault("model_parameters", model.parameters())
    result = deepspeed.initialize(model=model, config=ds_config, **deepspeed_kwargs)
    install(result[0], config=ntl, vocab=vocab, on_output=on_output)
    return result
