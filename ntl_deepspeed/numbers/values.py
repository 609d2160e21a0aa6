"""What a token is worth: its numeric value in each mode, and float32's limits on it.

Modes (what counts as a number token):

``digits``   exactly the single characters ``0``..``9`` -- the reference's (ntloss) digit mode.
``integers`` a token whose text, after at most one leading word-boundary marker (``▁``, ``Ġ`` or a
             space), is one or more ASCII digits, valued as that integer: Llama-3/GPT-4 ``123``,
             GPT-2 ``Ġ48``, sentencepiece ``▁5``. The reference never treats marked tokens as
             numbers, so on such tokenizers it silently skips many number labels.
``floats``   any token that Python's ``float()`` parses to a finite value -- the reference's
             ``digit_level=False`` mode (``'05'``, ``'1e5'``, ``'1_000'``, ``'٣'``).
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from ..config import MODES

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


def as_float32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float64).float())


def shown(piece: str, limit: int = 48) -> str:
    """A token for a message: its repr, cut short (a tokenizer may hold a 400-digit token)."""
    return repr(piece) if len(piece) <= limit else \
        f"{piece[:limit]!r}... ({len(piece)} characters)"


def warn_float32(overflow, inexact, listed: int = 5) -> None:
    """One warning per problem, naming the first tokens: values beyond float32 are left out of
    the number tokens, values float32 rounds keep the rounded value."""
    def names(items):
        text = ", ".join(shown(item[1]) + (f" (id {item[0]}, becomes {item[2]:.9g})"
                                          if len(item) > 2 else f" (id {item[0]})")
                         for item in items[:listed])
        return text + (f" and {len(items) - listed} more" if len(items) > listed else "")

    if overflow:
        warnings.warn(f"{len(overflow)} number token(s) overflow float32 and are not treated "
                      f"as numbers: {names(overflow)}", RuntimeWarning, stacklevel=3)
    if inexact:
        warnings.warn(f"{len(inexact)} number token value(s) are not exactly representable in "
                      f"float32 and are rounded: {names(inexact)}", RuntimeWarning, stacklevel=3)
