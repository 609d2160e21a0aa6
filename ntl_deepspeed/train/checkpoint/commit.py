"""Saving: DeepSpeed writes into a staging folder; rank 0 commits it (manifest, rename,
``latest``) once every rank's files are on disk, then prunes old checkpoints."""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Dict, List, Optional

from .collectives import barrier, broadcast_from_rank0, gather_all, rank
from .engine import safe_engine
from .faults import Faults
from .files import fsync_dir, write_atomic
from .layout import LATEST, MANIFEST, RETIRED, RUN_CONFIG, STAGING, CheckpointError, step_tag
from .manifest import write_manifest
from .selection import committed


def save(engine, ckpt_dir: str, step: int, client_state: Dict[str, Any],
         config: Dict[str, Any], keep: int = 3, log: Callable[[str], None] = print) -> str:
    """Save and commit checkpoint ``step{step}`` (collective: every rank calls it). Returns its
    folder. ``keep``: how many complete checkpoints to keep (0: all)."""
    ce = safe_engine(engine)
    ce.faults.save_no += 1
    tag = step_tag(step)
    staging = os.path.join(ckpt_dir, STAGING + tag)
    if rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # a crashed attempt at the same step
    barrier()
    ce.written = {}
    engine.save_checkpoint(staging, tag=tag, client_state=client_state, save_latest=False)
    ce.faults.hit("saved")
    written = gather_all(ce.written)  # after DeepSpeed's closing barrier: every file is on disk
    error = None
    if rank() == 0:
        try:
            _commit(ckpt_dir, staging, tag, step, written, config, keep, ce.faults)
        except Exception as e:  # noqa: BLE001 - every rank must hear about it
            error = f"saving checkpoint {tag} failed: {type(e).__name__}: {e}"
    error = broadcast_from_rank0(error)
    if error:
        raise CheckpointError(error)
    if rank() == 0:
        log(f"checkpoint {os.path.join(ckpt_dir, tag)} saved")
    return os.path.join(ckpt_dir, tag)


def _commit(ckpt_dir: str, staging: str, tag: str, step: int, written: List[dict],
            config: Dict[str, Any], keep: int, faults: Faults) -> None:
    folder = os.path.join(staging, tag)
    write_atomic(os.path.join(folder, RUN_CONFIG),
                 json.dumps(config, indent=1, sort_keys=True).encode())
    write_manifest(folder, tag, step,
                   {path: digest for per_rank in written for path, digest in per_rank.items()})
    faults.hit("manifest")
    final = os.path.join(ckpt_dir, tag)
    retired = os.path.join(ckpt_dir, RETIRED + tag)
    if os.path.lexists(final):  # the same step saved again (after falling back): replace it
        shutil.rmtree(retired, ignore_errors=True)
        os.rename(final, retired)
    os.rename(folder, final)
    fsync_dir(ckpt_dir)
    faults.hit("renamed")
    for name in os.listdir(staging):  # DeepSpeed's recovery scripts, beside the checkpoints
        if os.path.isfile(os.path.join(staging, name)):
            os.replace(os.path.join(staging, name), os.path.join(ckpt_dir, name))
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(retired, ignore_errors=True)
    write_atomic(os.path.join(ckpt_dir, LATEST), tag.encode())
    faults.hit("latest")
    prune(ckpt_dir, keep, protect=tag)


def prune(ckpt_dir: str, keep: int, protect: Optional[str] = None) -> List[str]:
    """Delete all but the newest ``keep`` checkpoints with a manifest (0: keep all), never
    ``protect``, and leftovers of interrupted saves. Returns what was deleted."""
    removed = []
    for name in os.listdir(ckpt_dir):
        if name.startswith((STAGING, RETIRED)) and name != STAGING + (protect or ""):
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
            removed.append(name)
    if keep > 0:
        complete = [t for t in committed(ckpt_dir)
                    if os.path.isfile(os.path.join(ckpt_dir, t, MANIFEST))]
        for tag in complete[keep:]:
            if tag != protect:
                shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)
                removed.append(tag)
    return removed
