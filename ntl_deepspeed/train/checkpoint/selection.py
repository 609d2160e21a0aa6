"""Which checkpoint to resume from: the one ``latest`` names if complete, else the newest
complete one."""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Tuple

from .layout import LATEST, TAG_PATTERN, CheckpointError, step_of
from .manifest import verify


def read_latest(ckpt_dir: str) -> str:
    """The tag ``latest`` names, after checking that it is a folder directly inside
    ``ckpt_dir`` (no path separators, ``..``, absolute paths or symlinks out)."""
    path = os.path.join(ckpt_dir, LATEST)
    if not os.path.lexists(path):
        raise CheckpointError("there is no 'latest' file")
    if os.path.islink(path) or not os.path.isfile(path):
        raise CheckpointError("'latest' is not a regular file")
    with open(path, "rb") as f:
        raw = f.read(256)
    try:
        tag = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError("'latest' is not text") from None
    if not TAG_PATTERN.match(tag) or tag.startswith(".") or tag == LATEST:
        raise CheckpointError(f"'latest' names {tag!r}, not a checkpoint folder inside "
                              f"{ckpt_dir} (refused)")
    folder = os.path.join(ckpt_dir, tag)
    if os.path.islink(folder) or os.path.dirname(os.path.realpath(folder)) != \
            os.path.realpath(ckpt_dir):
        raise CheckpointError(f"'latest' names {tag!r}, which leads outside {ckpt_dir} (refused)")
    return tag


def committed(ckpt_dir: str) -> List[str]:
    """Folders named ``stepN`` (newest first); complete or not."""
    try:
        names = os.listdir(ckpt_dir)
    except FileNotFoundError:
        return []
    tags = [n for n in names if step_of(n) is not None
            and os.path.isdir(os.path.join(ckpt_dir, n))
            and not os.path.islink(os.path.join(ckpt_dir, n))]
    return sorted(tags, key=step_of, reverse=True)


def select(ckpt_dir: str, cache: Optional[dict] = None,
           log: Callable[[str], None] = print) -> Tuple[str, Dict[str, Any]]:
    """``(tag, manifest)`` of the checkpoint to resume from: the one ``latest`` names if it is
    complete, else the newest complete one (``log`` says which and why)."""
    problems, named = [], None
    try:
        named = read_latest(ckpt_dir)
        return named, verify(os.path.join(ckpt_dir, named), cache)
    except CheckpointError as e:
        latest_problem = f"'latest' names {named}, but {e}" if named else str(e)
        problems.append(latest_problem)
    for candidate in committed(ckpt_dir):
        if candidate == named:
            continue
        try:
            manifest = verify(os.path.join(ckpt_dir, candidate), cache)
        except CheckpointError as e:
            problems.append(f"{candidate}: {e}")
            continue
        log(f"--resume: {latest_problem}; resuming from {candidate}, the newest complete "
            f"checkpoint in {ckpt_dir}" + (f" (skipped: {'; '.join(problems[1:])})"
                                           if len(problems) > 1 else ""))
        return candidate, manifest
    raise CheckpointError(f"--resume: no complete checkpoint in {ckpt_dir}: "
                          + "; ".join(problems))
