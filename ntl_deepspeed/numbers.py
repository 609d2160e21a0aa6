"""The numeric value of every token of a model's (padded) vocabulary.

Modes (what counts as a number token):

``digits``   exactly the single characters ``0``..``9`` -- the reference's (ntloss) digit mode.
``integers`` a token whose text, after at most one leading word-boundary marker (``▁``, ``Ġ`` or a
             space), is one or more ASCII digits, valued as that integer: Llama-3/GPT-4 ``123``,
             GPT-2 ``Ġ48``, sentencepiece ``▁5``. The reference never treats marked tokens as
             numbers, so on such tokenizers it silently skips many number labels.
``floats``   any token that Python's ``float()`` parses to a finite value -- the reference's
             ``digit_level=False`` mode (``'05'``, ``'1e5'``, ``'1_000'``, ``'٣'``).

Run ``python -m ntl_deepspeed.numbers TOKENIZER [--mode M] [--text T]`` to inspect a tokenizer.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .token_sources import read_pieces

MODES = ("digits", "integers", "floats")
WORD_BOUNDARY_MARKERS = ("\u2581", "\u0120", " ")  # sentencepiece ▁, byte-level BPE Ġ, space


def token_value(piece: Optional[str], mode: str) -> Optional[float]:
    """The number a token stands for in ``mode``, or None."""
    if not piece:
        return None
    if mode == "digits":
        return float(piece) if len(piece) == 1 and "0" <= piece <= "9" else None
    if mode == "integers":
        body = piece[1:] if piece[0] in WORD_BOUNDARY_MARKERS else piece
        return float(int(body)) if body and body.isascii() and body.isdigit() else None
    if mode == "floats":
        try:
            v = float(piece)
        except ValueError:
            return None
        return v if math.isfinite(v) else None
    raise ValueError(f"unknown number-token mode {mode!r}: expected one of {MODES}")


def partition_bounds(vocab_size: int, world_size: int) -> List[Tuple[int, int]]:
    """[start, end) of each rank's vocab shard; uneven sizes give the first ranks one more id."""
    if world_size < 1 or vocab_size < world_size:
        raise ValueError(f"cannot split a vocab of {vocab_size} over {world_size} ranks")
    base, extra = divmod(vocab_size, world_size)
    bounds, start = [], 0
    for r in range(world_size):
        end = start + base + (1 if r < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice ``[start, end)`` of the vocab and the number tokens inside it."""

    start: int
    end: int
    number_ids: torch.Tensor     # int64, relative to ``start``
    number_values: torch.Tensor  # float32, same order

    @property
    def width(self) -> int:
        return self.end - self.start


class NumberVocab:
    """Numeric values over a model vocabulary (NaN for non-numbers). Never mutates a tokenizer."""

    def __init__(self, pieces: Sequence[Optional[str]], mode: str = "digits",
                 vocab_size: Optional[int] = None, tokenizer_size: Optional[int] = None):
        if mode not in MODES:
            raise ValueError(f"unknown number-token mode {mode!r}: expected one of {MODES}")
        tokenizer_size = len(pieces) if tokenizer_size is None else tokenizer_size
        vocab_size = tokenizer_size if vocab_size is None else int(vocab_size)
        if vocab_size < tokenizer_size:
            raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer's "
                             f"{tokenizer_size} ids; pass the model's (padded) vocab size")
        self.mode = mode
        self.vocab_size = vocab_size
        self.tokenizer_size = tokenizer_size
        values = torch.full((vocab_size,), float("nan"), dtype=torch.float32)
        tokens: Dict[int, str] = {}
        decimal_point_id = None
        for i, piece in enumerate(pieces[:tokenizer_size]):
            v = token_value(piece, mode)
            if v is not None:
                values[i] = v
                tokens[i] = piece
            elif piece == "." and decimal_point_id is None:
                decimal_point_id = i
        if not tokens:
            raise ValueError(f"the tokenizer has no number token in mode {mode!r}"
                             + (" (try mode='integers')" if mode == "digits" else ""))
        self.values = values
        self.number_ids = torch.nonzero(~torch.isnan(values)).squeeze(1)
        self.number_values = values[self.number_ids]
        self.number_tokens = tokens
        self.decimal_point_id = decimal_point_id
        self._device_cache: Dict[Any, Any] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_tokenizer(cls, tokenizer: Any, mode: str = "digits",
                       vocab_size: Optional[int] = None) -> "NumberVocab":
        """From a HF tokenizer, a tokenizer.json / directory, a sentencepiece ``.model``, a
        ``*.tiktoken`` file, a SentencePieceProcessor or a tiktoken Encoding."""
        pieces, size = read_pieces(tokenizer)
        return cls(pieces, mode=mode, vocab_size=vocab_size, tokenizer_size=size)

    @classmethod
    def from_tokens(cls, tokens: Sequence[Optional[str]], mode: str = "digits",
                    vocab_size: Optional[int] = None) -> "NumberVocab":
        """From a plain list of token strings (index = id)."""
        return cls(list(tokens), mode=mode, vocab_size=vocab_size)

    # ------------------------------------------------------------------ distances
    @property
    def value_range(self) -> Tuple[float, float]:
        return float(self.number_values.min()), float(self.number_values.max())

    def distance_span(self) -> Tuple[float, float]:
        """Smallest nonzero and largest distance between two number-token values."""
        uniq = torch.unique(self.number_values.double())
        if uniq.numel() < 2:
            raise ValueError("squash_factor needs at least two distinct number-token values")
        return float((uniq[1:] - uniq[:-1]).min()), float(uniq[-1] - uniq[0])

    def max_distance(self, kind: str, squash_factor: Optional[float] = None) -> float:
        """The largest per-token loss of ``kind`` between two number tokens (for ``reweigh``)."""
        vmin, vmax = self.value_range
        span = vmax - vmin
        if kind == "was":
            return float(squash_factor) if squash_factor is not None else span
        if kind == "mse":
            return span * span
        if kind == "l1":
            return span
        if kind == "huber":  # delta = 1, as torch's default
            return 0.5 * span * span if span < 1 else span - 0.5
        if kind == "number_level":  # symmetric MAPE is bounded by 1
            return 1.0
        raise ValueError(f"unknown NTL kind {kind!r}")

    # ------------------------------------------------------------------ sharding
    def shard(self, rank: Optional[int] = None, world_size: Optional[int] = None, *,
              start: Optional[int] = None, end: Optional[int] = None) -> VocabShard:
        """The slice of a vocab-parallel rank: by ``rank``/``world_size`` (even partition, see
        :func:`partition_bounds`) or by explicit ``start``/``end``."""
        if start is None:
            if rank is None or world_size is None:
                raise ValueError("shard() needs rank and world_size, or start and end")
            start, end = partition_bounds(self.vocab_size, world_size)[rank]
        if end is None or not 0 <= start < end <= self.vocab_size:
            raise ValueError(f"vocab shard [{start}, {end}) is not inside [0, {self.vocab_size})")
        in_shard = (self.number_ids >= start) & (self.number_ids < end)
        return VocabShard(start, end, self.number_ids[in_shard] - start,
                          self.number_values[in_shard])

    def on_device(self, device: torch.device, start: int, end: int):
        """(values, local number ids, local number values) on ``device``, cached."""
        key = (str(device), start, end)
        hit = self._device_cache.get(key)
        if hit is None:
            s = self.shard(start=start, end=end)
            hit = (self.values.to(device), s.number_ids.to(device), s.number_values.to(device))
            self._device_cache[key] = hit
        return hit

    def __repr__(self) -> str:
        vmin, vmax = self.value_range
        return (f"NumberVocab(mode={self.mode!r}, vocab_size={self.vocab_size}, "
                f"number_tokens={self.number_ids.numel()}, values=[{vmin:g}, {vmax:g}])")


# ---------------------------------------------------------------------- command line
def _describe(vocab: NumberVocab, tokenizer: Any, text: Optional[str]) -> str:
    lines = [repr(vocab)]
    ids = vocab.number_ids.tolist()
    examples = ids[:8] + (ids[-4:] if len(ids) > 12 else [])
    lines.append("examples: " + ", ".join(f"{i}:{vocab.number_tokens[i]!r}={vocab.values[i]:g}"
                                           for i in examples))
    if text is not None:
        token_ids, pieces = _encode(tokenizer, text)
        marked = [f"[{p}={vocab.values[i]:g}]" if i < vocab.vocab_size and
                  not math.isnan(vocab.values[i]) else p for i, p in zip(token_ids, pieces)]
        hits = sum(m.startswith("[") for m in marked)
        lines.append(f"text: {len(token_ids)} tokens, {hits} would receive NTL")
        lines.append(" ".join(marked))
    return "\n".join(lines)


def _encode(tokenizer: str, text: str) -> Tuple[List[int], List[str]]:
    import os

    from .token_sources import tokenizer_file_in

    path = (tokenizer_file_in(tokenizer) or tokenizer) if os.path.isdir(tokenizer) else tokenizer
    if path.endswith(".json"):
        from tokenizers import Tokenizer

        enc = Tokenizer.from_file(path).encode(text, add_special_tokens=False)
        return enc.ids, enc.tokens
    if path.endswith(".tiktoken"):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        ranks = load_tiktoken_bpe(path)
        enc = tiktoken.Encoding("file", pat_str=r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",
                                mergeable_ranks=ranks, special_tokens={})
        ids = enc.encode(text)
        return ids, [enc.decode([i]) for i in ids]
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=path)
    ids = sp.encode(text)
    return ids, [sp.id_to_piece(i) for i in ids]


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ntl_deepspeed.numbers",
                                 description="Show the number tokens of a tokenizer.")
    ap.add_argument("tokenizer", help="tokenizer.json / directory / sentencepiece .model / .tiktoken")
    ap.add_argument("--mode", choices=MODES, default="digits")
    ap.add_argument("--vocab-size", type=int, default=None, help="padded model vocab size")
    ap.add_argument("--text", default=None, help="sample text: which positions would get NTL")
    args = ap.parse_args(argv)
    vocab = NumberVocab.from_tokenizer(args.tokenizer, mode=args.mode, vocab_size=args.vocab_size)
    print(_describe(vocab, args.tokenizer, args.text))


if __name__ == "__main__":
    main()
