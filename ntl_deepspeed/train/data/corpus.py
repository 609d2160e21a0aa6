"""A deterministic corpus of sentences with quantities and arithmetic (no download).

Each sentence is a document. A held-out split (``--eval-fraction``) is a pure function of a
key, hashed (:func:`unit_hash`): the sentence's index (``by="sentences"``), or -- ``by="problems"``
-- for a sentence stating an arithmetic fact, the fact itself (operation and unordered operand
pair: ``17 + 25 = 42``, ``25 + 17 = 42`` and "Ada had 17 apples and bought 25 more, so Ada has 42
apples." are one problem), so a held-out problem is never seen in training in any wording;
sentences without a fact fall back to their index.
"""
from __future__ import annotations

import random
from typing import List, Optional, Tuple

_ITEMS = ["apples", "books", "chairs", "tickets", "bottles", "coins", "lamps", "boxes"]
_PEOPLE = ["Ada", "Ben", "Chloe", "Dev", "Eva", "Finn", "Gia", "Hugo"]
_UNITS = [("km", "drove"), ("kg", "carried"), ("liters", "poured"), ("minutes", "waited")]

Problem = Tuple[str, int, int]  # (operation, smaller operand, larger operand)
OPERATIONS = ("+", "-", "*")
_SALT_DOCUMENT = 0x5EED_D0C5
_SALT_PROBLEM = 0x5EED_0A4B
_MASK = (1 << 64) - 1


def unit_hash(key: int, salt: int = _SALT_DOCUMENT) -> float:
    """A deterministic hash of an integer into [0, 1) (splitmix64; same on every machine)."""
    z = (key * 0x9E3779B97F4A7C15 + salt) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return ((z ^ (z >> 31)) >> 11) / float(1 << 53)


def document_in_eval(index: int, fraction: float) -> bool:
    """Whether document ``index`` belongs to the held-out share ``fraction``."""
    return fraction > 0 and unit_hash(index, _SALT_DOCUMENT) < fraction


def problem_in_eval(problem: Problem, fraction: float) -> bool:
    """Whether an arithmetic fact belongs to the held-out share ``fraction``."""
    op, lo, hi = problem
    key = (OPERATIONS.index(op) * 1_000_003 + lo) * 1_000_003 + hi
    return fraction > 0 and unit_hash(key, _SALT_PROBLEM) < fraction


def _problem(op: str, x: int, y: int) -> Problem:
    return (op, min(x, y), max(x, y))


def _sentence_and_problem(rng: random.Random) -> Tuple[str, Optional[Problem]]:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    kind = rng.randrange(7)
    if kind == 0:
        return f"{a} + {b} = {a + b}", _problem("+", a, b)
    if kind == 1:
        hi, lo = max(a, b), min(a, b)
        return f"{hi} - {lo} = {hi - lo}", _problem("-", a, b)
    if kind == 2:
        x, y = rng.randint(2, 99), rng.randint(2, 99)
        return f"{x} * {y} = {x * y}", _problem("*", x, y)
    if kind == 3:
        who, item = rng.choice(_PEOPLE), rng.choice(_ITEMS)
        return (f"{who} had {a} {item} and bought {b} more, so {who} has {a + b} {item}.",
                _problem("+", a, b))
    if kind == 4:
        who, (unit, verb) = rng.choice(_PEOPLE), rng.choice(_UNITS)
        return f"{who} {verb} {a}.{rng.randint(0, 9)} {unit} on day {rng.randint(1, 28)}.", None
    if kind == 5:
        return f"In {rng.randint(1900, 2030)} the town had {a * 10 + b % 10} people.", None
    item = rng.choice(_ITEMS)
    x, y = a % 50 + 1, b % 20 + 1
    return f"A box holds {x} {item}; {y} boxes hold {x * y} {item}.", _problem("*", x, y)


def _sentence(rng: random.Random) -> str:
    return _sentence_and_problem(rng)[0]


def generate(n_sentences: int, seed: int = 0) -> List[str]:
    """``n_sentences`` sentences, identical for the same seed on every machine."""
    rng = random.Random(seed)
    return [_sentence(rng) for _ in range(n_sentences)]


def generate_split(n_sentences: int, seed: int = 0, eval_fraction: float = 0.0,
                   by: str = "problems") -> Tuple[List[str], List[str]]:
    """(training sentences, held-out sentences) of :func:`generate`'s corpus (same sentences,
    same order); ``by`` is ``"problems"`` or ``"sentences"`` (see the module docstring)."""
    if by not in ("problems", "sentences"):
        raise ValueError(f"by must be 'problems' or 'sentences', got {by!r}")
    rng = random.Random(seed)
    train: List[str] = []
    held: List[str] = []
    for index in range(n_sentences):
        text, problem = _sentence_and_problem(rng)
        if by == "problems" and problem is not None:
            out = problem_in_eval(problem, eval_fraction)
        else:
            out = document_in_eval(index, eval_fraction)
        (held if out else train).append(text)
    return train, held


def _random_problem(rng: random.Random, op: str) -> Tuple[str, int, Problem]:
    """(prompt, answer, problem) in the corpus' wording of the bare statements."""
    if op == "*":
        x, y = rng.randint(2, 99), rng.randint(2, 99)
        return f"{x} * {y} =", x * y, _problem("*", x, y)
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    if op == "+":
        return f"{a} + {b} =", a + b, _problem("+", a, b)
    hi, lo = max(a, b), min(a, b)
    return f"{hi} - {lo} =", hi - lo, _problem("-", a, b)


def arithmetic_prompts(n: int, eval_fraction: float, seed: int = 2024
                       ) -> List[Tuple[str, int, str]]:
    """``n`` distinct prompts ``(prompt, answer, operation)``, "+", "-", "*" in turn. With
    ``eval_fraction > 0`` only held-out problems (:func:`problem_in_eval`): never seen in
    training by a run with ``--eval-split problems`` and the same fraction. The same list for
    every run (``seed`` is not the training seed)."""
    rng = random.Random(seed)
    out, seen = [], set()
    for i in range(n):
        op = OPERATIONS[i % len(OPERATIONS)]
        for _ in range(100_000):
            prompt, answer, problem = _random_problem(rng, op)
            if problem not in seen and (eval_fraction <= 0 or
                                        problem_in_eval(problem, eval_fraction)):
                break
        else:
            raise ValueError(f"fewer than {n} distinct held-out {op!r} problems at "
                             f"eval fraction {eval_fraction}")
        seen.add(problem)
        out.append((prompt, answer, op))
    return out
