"""A deterministic corpus of sentences with quantities and arithmetic (no download)."""
from __future__ import annotations

import random
from typing import List

_ITEMS = ["apples", "books", "chairs", "tickets", "bottles", "coins", "lamps", "boxes"]
_PEOPLE = ["Ada", "Ben", "Chloe", "Dev", "Eva", "Finn", "Gia", "Hugo"]
_UNITS = [("km", "drove"), ("kg", "carried"), ("liters", "poured"), ("minutes", "waited")]


def _sentence(rng: random.Random) -> str:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    kind = rng.randrange(7)
    if kind == 0:
        return f"{a} + {b} = {a + b}"
    if kind == 1:
        hi, lo = max(a, b), min(a, b)
        return f"{hi} - {lo} = {hi - lo}"
    if kind == 2:
        x, y = rng.randint(2, 99), rng.randint(2, 99)
        return f"{x} * {y} = {x * y}"
    if kind == 3:
        who, item = rng.choice(_PEOPLE), rng.choice(_ITEMS)
        return f"{who} had {a} {item} and bought {b} more, so {who} has {a + b} {item}."
    if kind == 4:
        who, (unit, verb) = rng.choice(_PEOPLE), rng.choice(_UNITS)
        return f"{who} {verb} {a}.{rng.randint(0, 9)} {unit} on day {rng.randint(1, 28)}."
    if kind == 5:
        return f"In {rng.randint(1900, 2030)} the town had {a * 10 + b % 10} people."
    item = rng.choice(_ITEMS)
    return f"A box holds {a % 50 + 1} {item}; {b % 20 + 1} boxes hold " \
           f"{(a % 50 + 1) * (b % 20 + 1)} {item}."


def generate(n_sentences: int, seed: int = 0) -> List[str]:
    """``n_sentences`` sentences, identical for the same seed on every machine."""
    rng = random.Random(seed)
    return [_sentence(rng) for _ in range(n_sentences)]

