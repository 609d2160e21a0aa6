"""DeepSpeed: the ``"ntl"`` section of a ds_config, and NTL installed on an engine.

What a user's own training script calls; our trainer (:mod:`ntl_deepspeed.train`) uses exactly
this. ``split_config`` validates and removes ``"ntl"`` before DeepSpeed sees the config
(DeepSpeed accepts unknown top-level keys silently). ``install`` puts CE + lambda*NTL on the
engine's model -- as its ``loss_function`` (materialised logits) or inside its ``lm_head``
(``fused_head``) -- with the layout DeepSpeed chose: data parallel only, or AutoTP with a
vocab-parallel head (its TP group and ``vocab_start_index``).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Union

from ..config import NTLConfig
from ..loss import CENTLOutput
from ..numbers import NumberVocab
from .flops import book_into_root

REQUIRED_DEEPSPEED = "0.19.8"  # the vocab-parallel AutoTP head exists only there


def split_config(ds_config: Union[Dict[str, Any], str], source: Optional[str] = None
                 ) -> Tuple[Dict[str, Any], NTLConfig]:
    """(DeepSpeed's own config without ``"ntl"``, the validated NTLConfig). ``ds_config`` may be
    a dict or a JSON path; errors name the file and the key. No section: NTL disabled."""
    if isinstance(ds_config, str):
        source = source or ds_config
        try:
            with open(ds_config) as f:
                ds_config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: not valid JSON ({e})") from None
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


def check_deepspeed_for_autotp(ds_config: dict) -> None:
    import deepspeed

    tp = ds_config.get("tensor_parallel") or {}
    if autotp_size(ds_config) > 1 and tp.get("vocab_parallel_lm_head") and \
            deepspeed.__version__ != REQUIRED_DEEPSPEED:
        raise RuntimeError(f"AutoTP with a vocab-parallel lm_head needs deepspeed=="
                           f"{REQUIRED_DEEPSPEED}; installed: {deepspeed.__version__}")


def skip_shm_comm_build() -> None:
    """DeepSpeed JIT-compiles a shared-memory comm op (~45 s) at init on CPU; gloo needs none."""
    import importlib

    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


@dataclass
class Layout:
    """How DeepSpeed laid the model out: the vocab-parallel head's group and first id (None
    without AutoTP) and the data-parallel group."""

    tp_group: Any
    vocab_start_index: Optional[int]
    dp_group: Any
    tp_size: int


def engine_layout(engine) -> Layout:
    import torch.distributed as dist
    from deepspeed.utils import groups

    tp = autotp_size(engine._config._param_dict)  # the raw dict DeepSpeed was given
    if tp <= 1:
        return Layout(None, None, dist.group.WORLD, 1)
    head = engine.module.get_output_embeddings()
    start = getattr(head, "vocab_start_index", None)
    if start is None:
        raise RuntimeError("AutoTP did not make lm_head vocab-parallel: set "
                           '"tensor_parallel": {"vocab_parallel_lm_head": true}')
    return Layout(groups.get_tensor_model_parallel_group(), start,
                  groups.get_data_parallel_group(), tp)


def install(engine, vocab: NumberVocab, config: NTLConfig,
            on_output: Optional[Callable[[CENTLOutput], None]] = None):
    """CE + lambda*NTL on ``engine.module`` for the engine's layout; returns the HF loss
    settings (``.tp_group``, ``.dp_group`` ...). The flops profiler books the op's work."""
    from ..patches import fused_head, transformers as hf
    from ..patches.hf_loss import HFLoss

    layout = engine_layout(engine)
    loss = HFLoss(vocab, config, layout.tp_group, layout.vocab_start_index, layout.dp_group,
                  on_output if config.log_metrics else None)
    if config.fused_head:  # the loss runs inside lm_head, where ZeRO-3 gathers its weight
        fused_head.install(engine.module, loss)
    else:
        hf.apply(vocab, config, model=engine.module, tp_group=loss.tp_group,
                 vocab_start_index=loss.vocab_start_index, dp_group=loss.dp_group,
                 on_output=loss.on_output)
    book_into_root(engine.module)  # flops profiler: see flops.py
    return loss
