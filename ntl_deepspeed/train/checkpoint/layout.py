"""Names inside ``output-dir/checkpoints`` and the one error type of the checkpoint package."""
from __future__ import annotations

import re
from typing import Optional

MANIFEST = "manifest.json"
RUN_CONFIG = "run_config.json"
LATEST = "latest"
STAGING = ".tmp-"   # a save in progress (or interrupted by a crash): never loaded
RETIRED = ".old-"   # a checkpoint being replaced by a new save of the same step
FORMAT = "ntl-deepspeed-checkpoint/1"
TAG_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_STEP = re.compile(r"^step(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, tampered with, or from another setup."""


def step_tag(step: int) -> str:
    return f"step{step}"


def step_of(tag: str) -> Optional[int]:
    m = _STEP.match(tag)
    return int(m.group(1)) if m else None
