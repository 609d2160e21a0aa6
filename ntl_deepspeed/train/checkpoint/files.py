"""Durable files: content digests, fsync of directories, atomic replacement."""
from __future__ import annotations

import hashlib
import os
from typing import Tuple

_READ_CHUNK = 1 << 22


def file_digest(path: str) -> Tuple[int, str]:
    """(size, sha256 hex) of a file, read in chunks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_READ_CHUNK)
            if not chunk:
                return size, h.hexdigest()
            h.update(chunk)
            size += len(chunk)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: str, write) -> None:
    """Open ``path`` for writing, let ``write(file)`` fill it, then flush and fsync it."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, ``os.replace`` it onto
    ``path`` and fsync the directory: readers see the old or the new content, never a part."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{os.getpid()}")
    write_synced(tmp, lambda f: f.write(data))
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")
