"""Resuming: rank 0 selects and verifies the checkpoint and compares its setup; every rank
then loads it through the verifying engine."""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Tuple

from .collectives import broadcast_from_rank0, rank
from .engine import safe_engine
from .layout import RUN_CONFIG, CheckpointError
from .run_setup import differences
from .selection import select


def resume(engine, ckpt_dir: str, config: Dict[str, Any], allow_change: bool = False,
           log: Callable[[str], None] = print) -> Tuple[str, Dict[str, Any]]:
    """Load the checkpoint to resume from into ``engine`` (collective). Returns ``(folder,
    client_state)``. Raises :class:`CheckpointError` (on every rank) when there is no complete
    checkpoint, or when its setup differs from ``config`` and ``allow_change`` is False."""
    ce = safe_engine(engine)
    universal = getattr(engine, "load_universal_checkpoint", None)
    if callable(universal) and universal():
        raise CheckpointError("--resume: DeepSpeed loads universal checkpoints with its own "
                              "torch.load(weights_only=False), bypassing the verified loader: "
                              "remove checkpoint.load_universal from the ds_config")
    decision = None
    if rank() == 0:
        try:
            tag, _ = select(ckpt_dir, ce.verified, log)
            with open(os.path.join(ckpt_dir, tag, RUN_CONFIG)) as f:
                stored = json.load(f)
            decision = {"tag": tag, "changes": differences(stored, config)}
        except (CheckpointError, OSError, ValueError) as e:
            decision = {"error": str(e)}
    decision = broadcast_from_rank0(decision)
    if "error" in decision:
        raise CheckpointError(decision["error"])
    tag, changes = decision["tag"], decision["changes"]
    folder = os.path.join(ckpt_dir, tag)
    if changes and not allow_change:
        raise CheckpointError(
            f"--resume: {folder} was trained with a different setup: " + "; ".join(changes)
            + ". Resume with the same setup, or pass --allow-config-change")
    if changes and rank() == 0:
        log(f"--allow-config-change: resuming {folder} with a changed setup: "
            + "; ".join(changes))
    path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag)
    if path is None:
        raise CheckpointError(f"--resume: DeepSpeed could not load {folder}")
    if rank() == 0:
        log(f"--resume: continuing from {folder}")
    return folder, client_state
