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
A :class:`VocabShard` is one tensor-parallel rank's slice of the vocab, built once per layout and
handed to every loss path (logits, hidden states, DeepSpeed AutoTP, Megatron, no TP).
"""
from __future__ import annotations

import math
import functools
import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..config import MODES
from ..parallel import group_size_rank
from .token_sources import read_pieces

WORD_BOUNDARY_MARKERS = ("\u2581", "\u0120", " ")  # sentencepiece ▁, byte-level BPE Ġ, space


def token_value(piece: Optional[str], mode: str) -> Optional[float]:
    """The number a token stands for in ``mode``, or None."""
    if not piece:
        return None
    if mode == "digits":
        return float(piece) if len(piece) == 1 and "0" <= piece <= "9" else None
    if mode == "integers":
        body = piece[1:] if piece[0] in WORD_BOUNDARY_MARKERS else piece
        if not (body and body.isascii() and body.isdigit()):
            return None
        try:
            return float(int(body))
        except OverflowError:  # beyond float64 (300+ digits): reported as overflowing float32
            return math.inf
    if mode == "floats":
        try:
            v = float(piece)
        except ValueError:
            return None
        # "1e400" is a number too large for any float (reported); "inf" / "nan" are words
        return v if math.isfinite(v) or (math.isinf(v) and any(c.isdigit() for c in piece)) \
            else None
    raise ValueError(f"unknown number-token mode {mode!r}: expected one of {MODES}")


def _as_float32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float64).float())


def _shown(piece: str, limit: int = 48) -> str:
    """A token for a message: its repr, cut short (a tokenizer may hold a 400-digit token)."""
    return repr(piece) if len(piece) <= limit else \
        f"{piece[:limit]!r}... ({len(piece)} characters)"


def _warn_float32(overflow, inexact, shown: int = 5) -> None:
    """One warning per problem, naming the first tokens: values beyond float32 are left out of
    the number tokens, values float32 rounds keep the rounded value."""
    def names(items):
        text = ", ".join(_shown(item[1]) + (f" (id {item[0]}, becomes {item[2]:.9g})"
                                          if len(item) > 2 else f" (id {item[0]})")
                         for item in items[:shown])
        return text + (f" and {len(items) - shown} more" if len(items) > shown else "")

    if overflow:
        warnings.warn(f"{len(overflow)} number token(s) overflow float32 and are not treated "
                      f"as numbers: {names(overflow)}", RuntimeWarning, stacklevel=3)
    if inexact:
        warnings.warn(f"{len(inexact)} number token value(s) are not exactly representable in "
                      f"float32 and are rounded: {names(inexact)}", RuntimeWarning, stacklevel=3)


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


@dataclass(frozen=True, eq=False)
class VocabShard:
    """One rank's slice ``[start, end)`` of the vocab, its number tokens, and its group.

    Built once by :meth:`NumberVocab.shard_for` (cached) and handed to every loss path. Tensors
    live on the logits' device. ``fits`` is False when the rank's logits width does not match its
    claimed slice: the op then reports it through its first collective, so that every rank of
    ``group`` raises the same error instead of some waiting forever.
    """

    vocab: "NumberVocab"
    start: int
    end: int
    width: int                   # columns of this rank's logits / head rows
    group: Any                   # tensor-parallel process group, None without TP
    group_size: int
    rank: int
    fits: bool
    number_ids: torch.Tensor     # int64, relative to ``start``, all < width
    number_values: torch.Tensor  # float32, same order
    values: torch.Tensor         # float32 [vocab_size]: every token's value (NaN: not a number)
    column_to_number: torch.Tensor  # int64 [width]: index into number_ids, -1 elsewhere

    @property
    def vocab_size(self) -> int:
        return self.vocab.vocab_size

    @property
    def parallel(self) -> bool:
        return self.group_size > 1


def label_targets(labels: torch.Tensor, values: torch.Tensor, ignore_index: int):
    """``(valid, is_number, y)`` per label: not ignored; a number token; its value (0 elsewhere).
    Ids outside the vocab are clamped here (they are reported by the input checks)."""
    valid = labels != ignore_index
    ids = torch.where(valid, labels, 0).clamp(0, values.numel() - 1)
    value = values[ids]
    is_number = valid & ~torch.isnan(value)
    return valid, is_number, torch.where(is_number, value, torch.zeros_like(value))


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
                v32 = _as_float32(v)
                if not math.isfinite(v32):  # inf would poison every NTL of the batch
                    overflow.append((i, piece))
                    continue
                if v32 != v:
                    inexact.append((i, piece, v32))
                values[i] = v32
                tokens[i] = piece
            elif piece == "." and decimal_point_id is None:
                decimal_point_id = i
        _warn_float32(overflow, inexact)
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

    def gradient_bound(self, kind: str = "was", weight: float = 1.0, reweigh: bool = False,
                       squash_factor: Optional[float] = None) -> float:
        """An upper bound of ``|d (weight * NTL) / d logit|`` for one token (reduction
        ``sum``), from the spread of the number-token values: ``weight * span`` for WAS, L1 and
        Huber (``squash_factor`` for a squashed WAS), ``weight * 2 span^2`` for MSE, plus
        ``1.01 * max_distance`` with ``reweigh``. The op computes in fp32 and rounds the
        gradient into the logits' dtype at the end, so this must fit that dtype."""
        vmin, vmax = self.value_range
        span = vmax - vmin
        if kind == "mse":
            bound = 2.0 * span * span
        elif kind == "number_level":  # digits only: a small multiple of the digit span
            bound = 2.0 * span
        elif kind == "was" and squash_factor is not None:
            bound = float(squash_factor)
        else:  # was, l1, huber: |p_k (D_k - l)| or |p_k (v_k - yhat)| <= span
            bound = span
        if reweigh:
            bound += 1.01 * self.max_distance(kind, squash_factor)
        return float(weight) * bound

    def largest_token(self) -> Tuple[int, str, float]:
        """(id, text, value) of the number token of largest magnitude (for messages)."""
        i = int(self.number_values.abs().argmax())
        token_id = int(self.number_ids[i])
        return token_id, self.number_tokens.get(token_id, "?"), float(self.number_values[i])

    def fp32_bound(self, kind: str = "was", reweigh: bool = False,
                   squash_factor: Optional[float] = None) -> float:
        """An upper bound of the op's float32 intermediates (it always computes in fp32): the
        per-token sums taken before normalising, ``sum_k e_k v_k`` and ``sum_k e_k D(v_k, y)``
        with ``e_k <= 1`` (so at most ``sum_k |v_k|`` and ``sum_k max_y |v_k - y|``), the loss
        and its unweighted gradient."""
        v = self.number_values.double()
        vmin, vmax = self.value_range
        sums = float(v.abs().sum())
        if kind == "was":
            sums = max(sums, len(v) * float(squash_factor) if squash_factor is not None else
                       float(torch.maximum((v - vmin).abs(), (v - vmax).abs()).sum()))
        return max(sums, self.gradient_bound(kind, 1.0, reweigh, squash_factor))

    def check_representable(self, dtype: torch.dtype, kind: str = "was", weight: float = 1.0,
                            reweigh: bool = False, squash_factor: Optional[float] = None) -> None:
        """Raise a ValueError when the op's float32 arithmetic can overflow on these number
        values (e.g. MSE on a float token ``1e20``: squared distances ``1e40``), or when NTL's
        gradient on logits of ``dtype`` can overflow it (e.g. NTL-MSE on integer tokens up to
        999 in float16: ``2 * 999^2 * 0.3 = 6e5 > 65504``; even the loss scale 1 cannot help).
        Measured: ``ce_ntl`` with fp16 logits and number tokens up to 1e6 gives an inf gradient
        for MSE, and for WAS/L1/Huber as soon as a loss scale is applied. bf16 and fp32 have
        float32's range. Host arithmetic on the vocab's table only; cached per arguments."""
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"check_representable: {dtype} is not a floating-point dtype")
        key = (dtype, kind, float(weight), bool(reweigh), squash_factor)
        if key in self._representable:
            return
        fp32_max = torch.finfo(torch.float32).max
        inner = self.fp32_bound(kind, reweigh, squash_factor)
        if not inner < fp32_max:
            raise ValueError(
                f"{self._range_subject(kind, weight, reweigh)}: the loss's float32 arithmetic "
                f"reaches {inner:.3g}, beyond float32's largest value {fp32_max:.6g}: the loss "
                "would be inf or NaN in any dtype. Fix: " + ", or ".join(
                    self._range_fixes(kind, squash_factor)
                    + ["leave such tokens out of the number vocabulary"]))
        limit = torch.finfo(dtype).max
        bound = self.gradient_bound(kind, weight, reweigh, squash_factor)
        if not bound < limit:
            raise ValueError(
                f"{self._range_subject(kind, weight, reweigh)} can give logit gradients up to "
                f"{bound:.3g} per token, beyond {dtype}'s largest value {limit:.6g}: the "
                "gradients would overflow to inf. Fix: " + ", or ".join(
                    ["train in bf16 or fp32"] + self._range_fixes(kind, squash_factor)))
        self._representable.add(key)

    def _range_subject(self, kind: str, weight: float, reweigh: bool) -> str:
        vmin, vmax = self.value_range
        token_id, text, value = self.largest_token()
        return (f"NTL kind={kind!r} (weight {weight:g}{', reweigh' if reweigh else ''}) on "
                f"number tokens valued {vmin:g}..{vmax:g} (mode {self.mode!r}; largest: token "
                f"{_shown(text)}, id {token_id}, value {value:g})")

    def _range_fixes(self, kind: str, squash_factor: Optional[float]) -> List[str]:
        fixes = []
        if kind != "was":
            fixes.append("use kind='was' (gradients ~ the value span, not its square)")
        if kind == "was" and squash_factor is None:
            fixes.append("set a squash_factor")
        if self.mode != "digits":
            fixes.append("use mode='digits'")
        return fixes

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
            hit = self._shard_cache[key] = self._build_shard(int(width), group, start, device)
        return hit

    def _build_shard(self, width: int, group, start: Optional[int], device) -> VocabShard:
        size, rank = group_size_rank(group)
        if size == 1:
            if start not in (None, 0):
                raise ValueError(f"vocab_start_index={start} was given without a tensor-parallel "
                                 "group (tp_group=None or of size 1): the logits must then hold "
                                 "the whole vocab; pass the TP group too")
            if width != self.vocab_size:
                raise ValueError(f"logits have {width} vocab entries but the NumberVocab has "
                                 f"{self.vocab_size}; build it with vocab_size={width}, or pass "
                                 "the tensor-parallel group and this shard's vocab_start_index")
            start, end = 0, width
        elif start is None:
            start, end = partition_bounds(self.vocab_size, size)[rank]
        else:
            start, end = int(start), int(start) + width
        fits = end - start == width and 0 <= start < end <= self.vocab_size
        lo = min(max(start, 0), self.vocab_size - 1)  # in bounds even when it does not fit
        ids, vals = self.slice_numbers(lo, min(max(end, lo + 1), self.vocab_size))
        keep = ids < width
        ids, vals = ids[keep], vals[keep]
        column_to_number = torch.full((width,), -1, dtype=torch.long)
        column_to_number[ids] = torch.arange(ids.numel())
        to = functools.partial(torch.Tensor.to, device=torch.device(device))
        return VocabShard(self, start, end, width, group, size, rank, fits, to(ids), to(vals),
                          to(self.values), to(column_to_number))

    def __repr__(self) -> str:
        vmin, vmax = self.value_range
        return (f"NumberVocab(mode={self.mode!r}, vocab_size={self.vocab_size}, "
                f"number_tokens={self.number_ids.numel()}, values=[{vmin:g}, {vmax:g}])")
