"""Our trainer under DeepSpeed Ulysses sequence parallelism (``--sequence-parallel N`` or the
ds_config's ``"sequence_parallel_size"``).

The N ranks of an SP group train on the same micro-batch: each takes its contiguous slice of
every sequence (inputs ``block[:-1]``, pre-shifted labels ``block[1:]``, global positions), as
DeepSpeed's ``UlyssesSPDataLoaderAdapter`` does; Ulysses' attention all-to-alls the slices and
the loss (``ntl_deepspeed.loss.token_weights``) all-reduces the counts over the group. Data replicas
(which blocks a rank reads) are the SP groups: ``world / N`` of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Optional

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from .options import TrainOptions


def sequence_parallel_size(args: "TrainOptions", ds_config: dict) -> int:
    """The SP size from ``--sequence-parallel`` and the ds_config (they must agree); the
    returned config carries it under ``"sequence_parallel_size"``."""
    from_config = int(ds_config.get("sequence_parallel_size", 1) or 1)
    from_args = args.sequence_parallel
    if from_args is not None and "sequence_parallel_size" in ds_config and \
            from_args != from_config:
        raise ValueError(f"--sequence-parallel {from_args} but the DeepSpeed config says "
                         f'"sequence_parallel_size": {from_config}')
    return from_config if from_args is None else from_args


def check_arguments(args: "TrainOptions", sp_size: int, seq_len: int, world_size: int, autotp: int) -> None:
    """What our trainer does not combine with SP: a clear error before any work."""
    if sp_size <= 1:
        return
    problems = []
    if world_size % sp_size:
        problems.append(f"the world size {world_size} is not a multiple of it")
    if seq_len % sp_size:
        problems.append(f"--seq-len {seq_len} is not a multiple of it")
    if autotp > 1:
        problems.append("AutoTP (tensor_parallel.autotp_size > 1) is not supported with it")
    if args.eval_fraction or args.eval_data or args.generate_eval:
        problems.append("evaluation (--eval-fraction / --eval-data / --generate-eval) is not "
                        "supported with it")
    if args.plain_ce:
        problems.append("--plain-ce: the model's own loss is not sequence parallel")
    if problems:
        raise ValueError(f"sequence parallel size {sp_size}: " + "; ".join(problems))


def register(model, sp_size: int, micro_batch: int, seq_len: int):
    """Ulysses attention for ``model`` (sdpa); returns the ``mpu`` for deepspeed.initialize."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    model.config._attn_implementation = "sdpa"  # Ulysses refuses eager; sdpa runs on CPU
    return UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation="sdpa",
        sequence_parallel_size=sp_size, micro_batch_size=micro_batch, seq_length=seq_len,
        seq_length_is_variable=False)


@dataclass
class SequenceSlicer:
    """This rank's slice of a micro-batch of blocks ``[B, seq_len + 1]``."""

    rank: int
    size: int

    @classmethod
    def from_mpu(cls, mpu) -> Optional["SequenceSlicer"]:
        if mpu is None:
            return None
        return cls(mpu.get_sequence_parallel_rank(), mpu.get_sequence_parallel_world_size())

    def __call__(self, blocks: torch.Tensor) -> Dict[str, torch.Tensor]:
        inputs, labels = blocks[:, :-1], blocks[:, 1:]
        chunk = inputs.shape[1] // self.size
        part = slice(self.rank * chunk, (self.rank + 1) * chunk)
        positions = torch.arange(inputs.shape[1], device=blocks.device).expand_as(inputs)
        shift = labels[:, part].contiguous()
        return {"input_ids": inputs[:, part].contiguous(),
                "position_ids": positions[:, part].contiguous(),
                "labels": shift, "shift_labels": shift}


def data_replica(sp_size: int):
    """(this rank's data replica, number of replicas): the SP groups (consecutive ranks, as
    ``parallel_state_sp`` builds them)."""
    return dist.get_rank() // sp_size, dist.get_world_size() // sp_size
