"""Read the token strings of a tokenizer, whatever form it comes in.

Every reader returns ``(pieces, size)``: ``pieces[i]`` is the text of token id ``i`` (``None`` for
ids whose bytes are not valid UTF-8) and ``size`` is the tokenizer's id count. The tokenizer is
never modified.
"""
from __future__ import annotations

import base64
import os
from typing import Any, List, Optional, Tuple

Pieces = Tuple[List[Optional[str]], int]

# A token id past this is a corrupt or hostile file, not a vocabulary (the largest real ones are
# ~256k): refused before a list of that size is allocated.
MAX_TOKEN_ID = 10_000_000


def _check_id(idx: int, where: str) -> int:
    if not 0 <= idx <= MAX_TOKEN_ID:
        raise ValueError(f"{where}: token id {idx} is outside [0, {MAX_TOKEN_ID:,}]: not a "
                         "real vocabulary (corrupt file?)")
    return idx


def _from_vocab_dict(vocab: dict, where: str = "tokenizer vocabulary") -> Pieces:
    for idx in vocab.values():
        _check_id(idx, where)
    size = max(vocab.values()) + 1 if vocab else 0
    pieces: List[Optional[str]] = [None] * size
    for token, idx in vocab.items():
        pieces[idx] = token
    return pieces, size


def from_hf_object(tok: Any) -> Pieces:
    """A transformers tokenizer (slow or fast): ``get_vocab()`` includes added tokens."""
    pieces, size = _from_vocab_dict(tok.get_vocab())
    size = max(size, len(tok))
    return pieces + [None] * (size - len(pieces)), size


def from_tokenizer_json(path: str) -> Pieces:
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own types
        raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
    return _from_vocab_dict(tokenizer.get_vocab(with_added_tokens=True), path)


def from_sentencepiece(sp: Any) -> Pieces:
    n = sp.get_piece_size()
    return [sp.id_to_piece(i) for i in range(n)], n


def from_sentencepiece_file(path: str) -> Pieces:
    import sentencepiece as spm

    return from_sentencepiece(spm.SentencePieceProcessor(model_file=path))


def _decode(b: bytes) -> Optional[str]:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return None


def from_tiktoken_file(path: str) -> Pieces:
    """A ``*.tiktoken`` BPE file: one ``base64(token-bytes) rank`` per line."""
    ranks = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                token_b64, rank = line.split()
                rank = int(rank)
                token = base64.b64decode(token_b64, validate=True)
            except ValueError as e:
                raise ValueError(f"{path}:{line_no}: not a tiktoken BPE line ({e})") from None
            ranks[_check_id(rank, f"{path}:{line_no}")] = token
    size = max(ranks) + 1 if ranks else 0
    pieces: List[Optional[str]] = [None] * size
    for rank, b in ranks.items():
        pieces[rank] = _decode(b)
    return pieces, size


def from_tiktoken_encoding(enc: Any) -> Pieces:
    size = enc.n_vocab
    pieces: List[Optional[str]] = []
    for i in range(size):
        try:
            pieces.append(_decode(enc.decode_single_token_bytes(i)))
        except KeyError:  # holes between ordinary and special ranks
            pieces.append(None)
    return pieces, size


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer.model.v1")


def tokenizer_file_in(directory: str) -> Optional[str]:
    """The tokenizer file a model directory holds (tokenizer.json first), or None."""
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return None


def tokenizer_file(path: str) -> Tuple[str, str]:
    """``(kind, file)`` for a tokenizer path: a directory is searched (tokenizer.json first,
    then tokenizer.model, then a ``*.tiktoken``); kind is ``json``, ``tiktoken`` or
    ``sentencepiece`` (by extension, else by content)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = tokenizer_file_in(path)
        tik = [n for n in sorted(os.listdir(path)) if n.endswith(".tiktoken")]
        if found is None and not tik:
            raise FileNotFoundError(f"{path}: no tokenizer.json, tokenizer.model or *.tiktoken "
                                    "inside")
        path = found or os.path.join(path, tik[0])
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer not found: {path}: no such file")
    if path.endswith(".json"):
        return "json", path
    if path.endswith(".tiktoken"):
        return "tiktoken", path
    with open(path, "rb") as f:
        head = f.read(64)
    return ("json" if head.lstrip().startswith(b"{") else "sentencepiece"), path


def read_pieces(source: Any) -> Pieces:
    """Recognise ``source`` and read its pieces (see module docstring)."""
    if isinstance(source, (str, os.PathLike)):
        kind, path = tokenizer_file(source)
        readers = {"json": from_tokenizer_json, "tiktoken": from_tiktoken_file}
        if kind in readers:
            return readers[kind](path)
        try:
            return from_sentencepiece_file(path)
        except Exception:
            pass
        try:
            return from_tiktoken_file(path)
        except ValueError:
            raise ValueError(f"{path}: not a tokenizer.json, sentencepiece model or tiktoken "
                             "file") from None
    if hasattr(source, "get_vocab") and hasattr(source, "__len__"):
        return from_hf_object(source)
    if hasattr(source, "id_to_piece") and hasattr(source, "get_piece_size"):
        return from_sentencepiece(source)
    if hasattr(source, "decode_single_token_bytes") and hasattr(source, "n_vocab"):
        return from_tiktoken_encoding(source)
    raise TypeError(f"cannot read tokens from {type(source).__name__}: expected a Hugging Face "
                    "tokenizer, a tokenizer.json/.model/.tiktoken path, a SentencePieceProcessor "
                    "or a tiktoken.Encoding")

