"""DeepSpeed Ulysses sequence parallelism (ALST): find its groups, refuse what cannot work.

Under Ulysses each rank of a sequence-parallel (SP) group holds a contiguous slice of the same
sequences (``UlyssesSPDataLoaderAdapter`` hands it pre-shifted ``shift_labels``), so the loss
of a micro-batch is the sum of the ranks' shares over *the whole sequence's* counts
(:func:`ntl_deepspeed.loss.token_weights`: two all-reduces of 2 floats on the SP group). DeepSpeed
reduces gradients over the data x sequence parallel group: ZeRO 0-2 sum them over the SP ranks
(they divide by the DP size only), ZeRO-3 averages them (``runtime/comm/coalesced_collectives``),
so there each share is scaled by the SP size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist

from ..config import NTLConfig
from ..parallel import SequenceParallel, group_size


@dataclass
class SPGroups:
    """This rank's SP group and the data x sequence parallel group (all ranks whose tokens
    differ; what ``normalization="global"`` and the metrics reduce over)."""

    sp_group: Any
    sp_size: int
    seq_dp_group: Any


def sequence_parallel_groups() -> Optional[SPGroups]:
    """The SP groups DeepSpeed knows (the ``mpu`` passed to ``deepspeed.initialize``), or None
    without sequence parallelism."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    try:
        from deepspeed.utils import groups
    except ImportError:
        return None
    if groups._get_sequence_parallel_world_size() <= 1:
        return None
    sp_group = groups._get_sequence_parallel_group()
    return SPGroups(sp_group, group_size(sp_group), groups._get_sequence_data_parallel_group())


def zero3_partitioned(engine_or_model) -> bool:
    """ZeRO-3 (gradients averaged over the SP group): the engine's stage, else partitioned
    parameters (a model an HF Trainer engine wraps)."""
    stage = getattr(engine_or_model, "zero_optimization_stage", None)
    if callable(stage):
        return stage() == 3
    model = getattr(engine_or_model, "module", engine_or_model)
    return any(hasattr(p, "ds_id") for p in model.parameters())


def check_sequence_parallel(config: NTLConfig, sp_size: int, *, vocab_parallel_head: bool,
                            pipeline: bool = False) -> None:
    """Start-up errors for combinations that cannot give the right loss."""
    if sp_size <= 1:
        return
    if vocab_parallel_head:
        raise ValueError(f"sequence parallelism (SP {sp_size}) with AutoTP is not supported: "
                         "the SP loss assumes every rank holds the whole LM head and its own "
                         "slice of the sequence, AutoTP needs identical batches on its TP "
                         "ranks. Use one of them")
    if pipeline:
        raise ValueError(f"sequence parallelism (SP {sp_size}) with a PipelineModule is not "
                         "supported (DeepSpeed's Ulysses SP is for Hugging Face models)")
    if config.enabled and config.kind == "number_level":
        raise ValueError(SequenceParallel.NUMBER_LEVEL)


def check_config_has_groups(ds_config: dict, mpu) -> None:
    """``"sequence_parallel_size": N`` in the ds_config needs the SP groups (the ``mpu`` that
    ``UlyssesSPAttentionHF.register_with_transformers`` returns): without them DeepSpeed would
    train every rank on its own slice as if it were data parallel."""
    size = int(ds_config.get("sequence_parallel_size", 1) or 1)
    if size > 1 and mpu is None and "data_parallel_size" not in ds_config:
        raise ValueError(f'the DeepSpeed config sets "sequence_parallel_size": {size} but no '
                         "mpu was passed: pass mpu=UlyssesSPAttentionHF.register_with_"
                         "transformers(...) to ntl_deepspeed.initialize")
    if mpu is not None and hasattr(mpu, "get_sequence_parallel_world_size"):
        groups_size = mpu.get_sequence_parallel_world_size()
        if groups_size != size:
            raise ValueError(f"the mpu has sequence-parallel size {groups_size} but the DeepSpeed "
                             f'config says "sequence_parallel_size": {size}')
