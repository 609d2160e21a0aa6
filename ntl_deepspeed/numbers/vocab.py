"""The numeric value of every token of a model's (padded) vocabulary (:class:`NumberVocab`).

What counts as a number in each mode: :mod:`.values`; how large NTL can get on these values:
:mod:`.bounds`; one tensor-parallel rank's slice: :mod:`.shard`.
Run ``python -m ntl_deepspeed.numbers TOKENIZER [--mode M] [--text T]`` to inspect a tokenizer.
"""
from __future__ import annotations

import functools
import math
import zlib
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from ..config import MODES
from ..parallel import group_size_rank
from . import bounds
from .shard import VocabShard, build_shard
from .token_sources import read_pieces
from .values import as_float32, token_value, warn_float32


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
        overflow, inexact = [], []
        for i, piece in enumerate(pieces[:tokenizer_size]):
            v = token_value(piece, mode)
            if v is not None:
                v32 = as_float32(v)
                if not math.isfinite(v32):  # inf would poison every NTL of the batch
                    overflow.append((i, piece))
                    continue
                if v32 != v:
                    inexact.append((i, piece, v32))
                values[i] = v32
                tokens[i] = piece
            elif piece == "." and decimal_point_id is None:
                decimal_point_id = i
        warn_float32(overflow, inexact)
        if not tokens:
            raise ValueError(f"the tokenizer has no number token in mode {mode!r}"
                             + (" (try mode='integers')" if mode == "digits" else ""))
        self.values = values
        self.number_ids = torch.nonzero(~torch.isnan(values)).squeeze(1)
        self.number_values = values[self.number_ids]
        self.number_tokens = tokens
        self.decimal_point_id = decimal_point_id
        self._shard_cache: Dict[Any, VocabShard] = {}
        self._representable: set = set()  # check_representable's passed arguments

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
    # host-side facts of the (CPU) value table, computed once: asked at every loss call
    @functools.cached_property
    def value_range(self) -> Tuple[float, float]:
        return float(self.number_values.min()), float(self.number_values.max())

    @functools.cached_property
    def fingerprint(self) -> int:
        """crc32 of the vocab size, the number-token ids and their values: equal for equal
        number vocabularies (the op compares it across tensor-parallel ranks)."""
        crc = zlib.crc32(str(self.vocab_size).encode())
        crc = zlib.crc32(self.number_ids.numpy().tobytes(), crc)
        return zlib.crc32(self.number_values.numpy().tobytes(), crc)

    def largest_token(self) -> Tuple[int, str, float]:
        """(id, text, value) of the number token of largest magnitude (for messages)."""
        i = int(self.number_values.abs().argmax())
        token_id = int(self.number_ids[i])
        return token_id, self.number_tokens.get(token_id, "?"), float(self.number_values[i])

    def max_distance(self, kind: str, squash_factor: Optional[float] = None) -> float:
        """The largest per-token loss of ``kind`` between two number tokens (for ``reweigh``;
        :mod:`.bounds`)."""
        return bounds.max_distance(self, kind, squash_factor)

    def gradient_bound(self, kind: str = "was", weight: float = 1.0, reweigh: bool = False,
                       squash_factor: Optional[float] = None) -> float:
        """A bound of ``|d (weight * NTL) / d logit|`` per token (:func:`.bounds.gradient_bound`)."""
        return bounds.gradient_bound(self, kind, weight, reweigh, squash_factor)

    def check_representable(self, dtype: torch.dtype, kind: str = "was", weight: float = 1.0,
                            reweigh: bool = False, squash_factor: Optional[float] = None) -> None:
        """Refuse number values whose NTL overflows float32 or whose gradient overflows
        ``dtype`` (:func:`.bounds.check_representable`); cached per arguments."""
        key = (dtype, kind, float(weight), bool(reweigh), squash_factor)
        if key not in self._representable:
            bounds.check_representable(self, dtype, kind, weight, reweigh, squash_factor)
            self._representable.add(key)

    @functools.cached_property
    def _distance_span(self) -> Optional[Tuple[float, float]]:
        uniq = torch.unique(self.number_values.double())
        if uniq.numel() < 2:
            return None
        return float((uniq[1:] - uniq[:-1]).min()), float(uniq[-1] - uniq[0])

    def distance_span(self) -> Tuple[float, float]:
        """Smallest nonzero and largest distance between two number-token values."""
        if self._distance_span is None:
            raise ValueError("squash_factor needs at least two distinct number-token values")
        return self._distance_span

    # ------------------------------------------------------------------ sharding
    def slice_numbers(self, start: int, end: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(number ids relative to ``start``, their values) inside ``[start, end)``."""
        if not 0 <= start < end <= self.vocab_size:
            raise ValueError(f"vocab shard [{start}, {end}) is not inside [0, {self.vocab_size})")
        inside = (self.number_ids >= start) & (self.number_ids < end)
        return self.number_ids[inside] - start, self.number_values[inside]

    def shard_for(self, width: int, group=None, start: Optional[int] = None,
                  device: Any = "cpu") -> VocabShard:
        """This rank's :class:`VocabShard` for logits (or head rows) ``width`` wide.

        Without a tensor-parallel ``group`` (None or of size 1) the logits must hold the whole
        vocab. With one, the slice is ``[start, start + width)`` when ``start`` is given (DeepSpeed
        AutoTP's ``vocab_start_index``, Megatron's layer), else the even partition by rank
        (:func:`partition_bounds`). Cached per (width, group, start, device)."""
        if start == 0 and group_size_rank(group)[0] == 1:
            start = None  # the same shard either way: one cache entry
        key = (int(width), group, start, str(torch.device(device)))
        hit = self._shard_cache.get(key)
        if hit is None:
            hit = self._shard_cache[key] = build_shard(self, int(width), group, start, device)
        return hit

    def __repr__(self) -> str:
        vmin, vmax = self.value_range
        return (f"NumberVocab(mode={self.mode!r}, vocab_size={self.vocab_size}, "
                f"number_tokens={self.number_ids.numel()}, values=[{vmin:g}, {vmax:g}])")
