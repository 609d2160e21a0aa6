"""Manifests (every file of a checkpoint with its size and sha256) and their verification."""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional

from .files import file_digest, write_atomic
from .layout import FORMAT, MANIFEST, RUN_CONFIG, CheckpointError


def folder_files(folder: str) -> List[str]:
    """Every file under ``folder`` (relative, '/'-separated); symlinks are refused."""
    found = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, folder).replace(os.sep, "/")
            if os.path.islink(full):
                raise CheckpointError(f"{rel} is a symlink (refused)")
            if name in files:
                found.append(rel)
    return found


def write_manifest(folder: str, tag: str, step: int, known: Dict[str, tuple]) -> None:
    """List every file of ``folder``; ``known`` maps absolute paths to the (size, sha256) their
    writer recorded (other files, e.g. copied by DeepSpeed itself, are hashed here)."""
    files = {}
    for rel in folder_files(folder):
        full = os.path.abspath(os.path.join(folder, *rel.split("/")))
        size, sha = known.get(full) or file_digest(full)
        files[rel] = {"size": size, "sha256": sha}
    manifest = {"format": FORMAT, "tag": tag, "step": step, "created": time.time(),
                "files": files}
    write_atomic(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=1).encode())


def read_manifest(folder: str) -> Dict[str, Any]:
    path = os.path.join(folder, MANIFEST)
    if os.path.islink(path) or not os.path.isfile(path):
        raise CheckpointError("no manifest.json (incomplete, or not written by this trainer)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"unreadable manifest.json ({e})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != FORMAT or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int)
            and isinstance(v.get("sha256"), str) for v in files.values()):
        raise CheckpointError("manifest.json is not a checkpoint manifest of this trainer")
    for name in files:
        parts = name.split("/")
        if os.path.isabs(name) or any(p in ("", ".", "..") for p in parts):
            raise CheckpointError(f"manifest.json lists an unsafe path {name!r}")
    return manifest


def verify(folder: str, cache: Optional[dict] = None) -> Dict[str, Any]:
    """The manifest of ``folder`` after checking it against the files: same set (no file the
    manifest does not list), sizes and sha256. Raises :class:`CheckpointError` with the reason."""
    if os.path.islink(folder) or not os.path.isdir(folder):
        raise CheckpointError("not a folder")
    manifest = read_manifest(folder)
    files = manifest["files"]
    present = set(folder_files(folder)) - {MANIFEST}
    extra = sorted(present - set(files))
    if extra:
        raise CheckpointError(f"{extra[0]} is not in the manifest (not written by this trainer)"
                              + (f", and {len(extra) - 1} more" if len(extra) > 1 else ""))
    missing = sorted(set(files) - present)
    if missing:
        raise CheckpointError(f"{missing[0]} is missing")
    if RUN_CONFIG not in files:
        raise CheckpointError(f"no {RUN_CONFIG}")
    for name, entry in sorted(files.items()):
        _check_file(os.path.join(folder, *name.split("/")), name, entry, cache)
    return manifest


def _check_file(path: str, name: str, entry: dict, cache: Optional[dict]) -> None:
    st = os.stat(path)
    if st.st_size != entry["size"]:
        raise CheckpointError(f"{name}: {st.st_size} bytes, the manifest says {entry['size']} "
                              "(truncated or replaced)")
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    digest = cache.get(key) if cache is not None else None
    if digest is None:
        digest = file_digest(path)[1]
        if cache is not None:
            cache[key] = digest
    if digest != entry["sha256"]:
        raise CheckpointError(f"{name}: sha256 mismatch (corrupted or modified)")


def check_listed(path: str, cache: Optional[dict] = None) -> None:
    """Before reading a checkpoint file: it must be listed, with its size and sha256, in the
    manifest of its checkpoint folder."""
    folder, name = os.path.split(os.path.abspath(path))
    for _ in range(3):  # the file may sit in a subfolder of the checkpoint
        if os.path.isfile(os.path.join(folder, MANIFEST)):
            break
        folder, sub = os.path.split(folder)
        name = f"{sub}/{name}"
    try:
        manifest = read_manifest(folder)
        entry = manifest["files"].get(name)
        if entry is None:
            raise CheckpointError("not in the manifest (not written by this trainer)")
        _check_file(path, name, entry, cache)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
