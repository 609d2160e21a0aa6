"""The user's own training text (``--data``, ``--eval-data``): files -> documents -> packed blocks.

Files: ``.txt`` and ``.jsonl`` (also gzipped, ``.txt.gz`` / ``.jsonl.gz``), or directories
holding them (walked recursively; files in sorted path order, so the order is the same on every
machine). Documents: **one per non-blank line** -- a line of a ``.txt`` file is a document (its
text without the line break), a line of a ``.jsonl`` file is a JSON object whose ``"text"``
string is the document. Blank lines are skipped and are not documents. Documents are numbered
0, 1, 2, ... across the files in that order (the *global document index*).

Sharding: data-parallel rank ``r`` of ``D`` trains on the documents whose global index ``i``
has ``i % D == r`` (round robin); every rank scans the lines, but only its own documents are
parsed and tokenized. The held-out split (``--eval-fraction``) is a hash of ``i``
(:func:`~ntl_deepspeed.train.data.corpus.document_in_eval`), so training and evaluation never
share a document, whatever the number of ranks. Tensor-parallel ranks of one DP rank read the
same documents (identical batches).

Packing: each document's tokens followed by EOS, concatenated in document order, cut into
blocks of ``seq_len + 1`` tokens (a document may straddle two blocks). Training data cycles
(epoch 2 starts again at the first document, same order). Memory holds one document and one
block, whatever the corpus size.

Resume: :class:`Position` says where the next block starts (epoch, file, byte offset of the
line, global document index, tokens of that document already used); the trainer stores every
DP rank's position in the checkpoint, and a resumed run seeks there directly.
"""
from __future__ import annotations

import gzip
import json
import os
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

from .corpus import document_in_eval

SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")


def list_files(paths: Sequence[str], option: str = "--data") -> List[str]:
    """The data files of ``paths`` (files or directories), in a deterministic order."""
    files: List[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = []
            for root, dirs, names in os.walk(path, followlinks=True):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [os.path.join(root, n) for n in names
                          if n.endswith(SUFFIXES) and not n.startswith(".")]
            if not found:
                raise ValueError(f"{option} {path}: no {'/'.join(SUFFIXES)} files in the "
                                 f"directory")
            files += sorted(found, key=lambda f: os.path.relpath(f, path).split(os.sep))
        elif os.path.isfile(path):
            if not path.endswith(SUFFIXES):
                raise ValueError(f"{option} {path}: not a {'/'.join(SUFFIXES)} file")
            files.append(path)
        else:
            raise FileNotFoundError(f"{option} {path}: no such file or directory")
    return files


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def document_text(path: str, raw: bytes, offset: int) -> str:
    """The document of one non-blank line of ``path`` (``raw``: its bytes)."""
    text = raw.decode("utf-8", errors="replace")
    if not (path.endswith(".jsonl") or path.endswith(".jsonl.gz")):
        return text.rstrip("\r\n")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} (line at byte {offset}): not valid JSON ({e})") from None
    value = record.get("text") if isinstance(record, dict) else None
    if not isinstance(value, str):
        raise ValueError(f"{path} (line at byte {offset}): no \"text\" string field")
    return value


@dataclass
class Position:
    """Where the next block starts. ``file``/``byte``: the line of the document ``document``
    (global index) when ``token`` > 0 (its first ``token`` tokens are used), else the next line
    to read. ``blocks``: blocks emitted so far by this stream."""

    epoch: int = 0
    file: int = 0
    byte: int = 0
    document: int = 0
    token: int = 0
    blocks: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "Position":
        return cls(**{k: int(d[k]) for k in asdict(cls()).keys()})


def iter_documents(files: Sequence[str], start_file: int = 0, start_byte: int = 0,
                   start_document: int = 0) -> Iterator[Tuple[int, int, int, int, bytes]]:
    """``(file index, byte offset of the line, end offset, global document index, line)``
    for every non-blank line, starting at a position."""
    document = start_document
    for fi in range(start_file, len(files)):
        offset = start_byte if fi == start_file else 0
        with _open(files[fi]) as f:
            if offset:
                f.seek(offset)
            for raw in f:
                here, offset = offset, offset + len(raw)
                if not raw.strip():
                    continue
                yield fi, here, offset, document, raw
                document += 1


class Selection:
    """Which documents a stream takes: this DP rank's round-robin share of the training
    documents (``split="train"``), of the held-out ones (``"eval"``), or of all (``"all"``:
    ``--eval-data``)."""

    def __init__(self, dp_rank: int, dp_size: int, split: str = "train",
                 eval_fraction: float = 0.0):
        if split not in ("train", "eval", "all"):
            raise ValueError(f"split must be train, eval or all, got {split!r}")
        self.dp_rank, self.dp_size, self.split, self.fraction = dp_rank, dp_size, split, \
            eval_fraction

    def __call__(self, index: int) -> bool:
        if index % self.dp_size != self.dp_rank:
            return False
        if self.split == "all":
            return True
        return document_in_eval(index, self.fraction) == (self.split == "eval")


class PackedStream:
    """Blocks of ``block_len`` token ids from the selected documents (see the module
    docstring). ``cycle``: start again at the first document when the files end (training);
    otherwise :meth:`next_block` returns the last, shorter block and then None."""

    def __init__(self, files: Sequence[str], encode: Callable[[str], List[int]], eos: int,
                 block_len: int, select: Callable[[int], bool], cycle: bool = True,
                 position: Optional[Position] = None, name: str = "--data"):
        self.files, self.encode, self.eos, self.block_len = list(files), encode, eos, block_len
        self.select, self.cycle, self.name = select, cycle, name
        self.position = position or Position()
        self._doc: Optional[List[int]] = None  # tokens of the current document (+ EOS)
        self._where = None                      # (file, byte, end, document) of it
        self._used = 0                          # its tokens already emitted
        self._selected_this_pass = 0
        self._lines = None
        self._open_at(self.position)

    def _open_at(self, p: Position) -> None:
        self._lines = iter_documents(self.files, p.file, p.byte, p.document)
        self._from_start = (p.file, p.byte, p.document) == (0, 0, 0)
        self._selected_this_pass = 0
        if p.token:  # resume inside a document: re-read it, skip what was used
            if not self._next_document():
                raise ValueError(f"{self.name}: the saved data position {p} is past the end of "
                                 f"the files: did they change since the checkpoint?")
            if self._where[3] != p.document or p.token > len(self._doc):
                raise ValueError(f"{self.name}: the saved data position {p} does not match the "
                                 f"files: did they change since the checkpoint?")
            self._used = p.token

    def _next_document(self) -> bool:
        """Load the next selected document; False at the end of the files."""
        for fi, here, end, index, raw in self._lines:
            if self.select(index):
                text = document_text(self.files[fi], raw, here)
                self._doc = list(self.encode(text)) + [self.eos]
                self._where, self._used = (fi, here, end, index), 0
                self._selected_this_pass += 1
                return True
        return False

    def next_block(self) -> Optional[List[int]]:
        block: List[int] = []
        while len(block) < self.block_len:
            if self._doc is None or self._used >= len(self._doc):
                if not self._next_document():
                    if self.cycle and self._from_start and self._selected_this_pass == 0:
                        raise ValueError(f"{self.name}: no documents for this data-parallel "
                                         f"rank (fewer documents than ranks?)")
                    if not self.cycle:
                        break
                    self.position.epoch += 1
                    self._open_at(Position(epoch=self.position.epoch))
                    continue
            take = min(self.block_len - len(block), len(self._doc) - self._used)
            block += self._doc[self._used:self._used + take]
            self._used += take
        if not block:
            return None
        fi, here, end, index = self._where
        p = self.position
        if self._used < len(self._doc):
            p.file, p.byte, p.document, p.token = fi, here, index, self._used
        else:
            p.file, p.byte, p.document, p.token = fi, end, index + 1, 0
        p.blocks += 1
        return block

    def state(self) -> dict:
        return asdict(self.position)
