"""NTLConfig: the one schema of every option, for every path.

Each field is declared once with its default, help text and allowed values (:func:`option`).
From these declarations come: the checks of ``NTLConfig(...)`` in Python, the ``"ntl"`` section of
a DeepSpeed config (:meth:`NTLConfig.from_dict`: unknown keys and wrongly typed values are
errors), and command-line flags (:func:`add_arguments` / :func:`from_arguments`, used by our
trainer and by the Megatron-LM glue). Types are strict: ``"0.3"`` is not a number, ``"yes"`` is
not a bool, NaN and infinities are rejected.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import math
import typing
from dataclasses import dataclass, fields
from typing import Any, Dict, Iterable, Optional

KINDS = ("was", "mse", "l1", "huber", "number_level")
MODES = ("digits", "integers", "floats")
# reweigh: the reference's factor on the worst distance, charged for mass off number tokens
REWEIGH_MARGIN = 1.01
NORMALIZATIONS = ("micro_batch", "global", "token")
BACKENDS = ("auto", "torch", "triton")
REDUCTIONS = ("mean", "sum", "none")
# the fields that change the loss's value (the others change how it runs): they must match on
# every tensor-parallel rank, and on resume
LOSS_FIELDS = ("enabled", "weight", "kind", "mode", "reweigh", "squash_factor", "normalization",
               "ignore_index", "float_level")


def option(default, help: str, *, choices: Optional[Iterable[str]] = None,
           ge: Optional[float] = None, gt: Optional[float] = None):
    """A field of :class:`NTLConfig`: default, help text, allowed values or bounds."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "ge": ge, "gt": gt}
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class NTLConfig:
    """What NTL to add to the cross-entropy, and how to run it (see each field's help)."""

    # ---- the loss
    enabled: bool = option(True, "add NTL (false: plain CE through the same op)")
    weight: float = option(0.3, "lambda in CE + lambda * NTL", ge=0)
    kind: str = option("was", "was: Wasserstein-1 (NTL-WAS); mse/l1/huber: NTL-Lp on the expected "
                              "value; number_level: whole numbers assembled from digits",
                       choices=KINDS)
    mode: str = option("digits", "which tokens are numbers: digits (0-9, the reference's), "
                                 "integers (also '123', 'Ġ48', '▁5'), floats (float() parses)",
                       choices=MODES)
    reweigh: bool = option(False, "scale NTL by the number tokens' probability mass (ntloss' "
                                  "default; off in the paper and here)")
    squash_factor: Optional[float] = option(None, "WAS only: map nonzero distances onto "
                                                  "[1, squash_factor]", gt=1)
    normalization: str = option(
        "micro_batch", "divide the summed NTL by: micro_batch (its number labels; the "
        "reference), global (number labels over the data-parallel group), token (valid tokens)",
        choices=NORMALIZATIONS)
    ignore_index: int = option(-100, "label id that marks positions without a loss")
    float_level: bool = option(False, "number_level only: a '.' between digits joins a number")
    # ---- how it runs
    check_finite: bool = option(
        False, "count non-finite logits every call and raise on any (one extra pass; a host sync)")
    check_inputs: bool = option(False, "check labels, weights and vocab shards on the host and "
                                       "name the bad id / rank (host syncs); off: the same "
                                       "checks run as device-side asserts")
    log_metrics: bool = option(True, "report CE, NTL, number accuracy and number MAE per step")
    fused_head: bool = option(False, "LM head + loss block by block: no logits")
    fused_block_size: Optional[int] = option(None, "fused head: vocab columns per block "
                                                   "(default: 1024 on CPU, 4096 on CUDA)", ge=1)
    fused_token_chunk: Optional[int] = option(None, "fused head: tokens per chunk (default: "
                                                    "from a memory budget when the gradients "
                                                    "are computed in the forward, else 2048 "
                                                    "on CPU, 8192 on CUDA)", ge=1)
    backend: str = option("auto", "kernels of the logits path: torch, triton, or auto (triton "
                                  "on CUDA when importable)", choices=BACKENDS)

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _checked(f, _hints()[f.name],
                                                      getattr(self, f.name)))
        if self.squash_factor is not None and self.kind != "was":
            raise ValueError("ntl.squash_factor applies to kind 'was' only")
        if self.float_level and self.kind != "number_level":
            raise ValueError("ntl.float_level applies to kind 'number_level' only")
        if self.kind == "number_level" and self.mode != "digits":
            raise ValueError("ntl.kind 'number_level' needs mode 'digits'")

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "NTLConfig":
        """From a mapping (the ``"ntl"`` section of a DeepSpeed config); unknown keys raise."""
        if not isinstance(values, dict):
            raise ValueError(f'"ntl" must be an object, got {type(values).__name__}')
        known = [f.name for f in fields(cls)]
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known: {known}"
                raise ValueError(f"ntl.{key}: unknown option{hint}")
        return cls(**values)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "NTLConfig":
        return dataclasses.replace(self, **changes)

    @property
    def active_weight(self) -> float:
        """lambda, or 0 when NTL is disabled."""
        return self.weight if self.enabled else 0.0


def read_json_object(path: str, what: str) -> Dict[str, Any]:
    """The JSON object in ``path``; errors (ValueError) name ``what`` (``--model x.json``) and why."""
    import os

    if not os.path.exists(path):
        raise ValueError(f"{what}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{what}: is a directory, expected a JSON file")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: not valid JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{what}: cannot be read ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{what}: expected a JSON object, got {type(raw).__name__}")
    return raw


def as_config(config) -> "NTLConfig":
    """An NTLConfig from an NTLConfig, a mapping (validated like the "ntl" section) or None."""
    if config is None:
        return NTLConfig()
    if isinstance(config, NTLConfig):
        return config
    if isinstance(config, dict):
        return NTLConfig.from_dict(config)
    raise TypeError(f"expected an NTLConfig or a dict of its fields, got {type(config).__name__}")


@functools.lru_cache(maxsize=None)
def _hints() -> Dict[str, Any]:
    return typing.get_type_hints(NTLConfig)


def _checked(f: dataclasses.Field, hint, value):
    """``value`` for field ``f`` (ints widened to float for float fields), or a ValueError
    naming the field."""
    name, meta = f"ntl.{f.name}", f.metadata
    optional = typing.get_origin(hint) is typing.Union
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name}: must be set (got None)")
    if base is bool and not isinstance(value, bool):
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    if base is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{name}: must be finite, got {value}")
    if base is str and not isinstance(value, str):
        raise ValueError(f"{name}: expected a string, got {value!r}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ValueError(f"{name}={value!r}: expected one of {meta['choices']}")
    if meta.get("ge") is not None and not value >= meta["ge"]:
        raise ValueError(f"{name}={value}: must be >= {meta['ge']}")
    if meta.get("gt") is not None and not value > meta["gt"]:
        raise ValueError(f"{name}={value}: must be > {meta['gt']}")
    return value


# ---------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser, prefix: str = "ntl",
                  exclude: Iterable[str] = ()) -> argparse._ArgumentGroup:
    """One ``--{prefix}-{field}`` flag per field (booleans as ``--x`` / ``--no-x``); defaults
    are None so that :func:`from_arguments` can tell what was given."""
    group = parser.add_argument_group("number token loss (ntl-deepspeed)")
    for f in fields(NTLConfig):
        if f.name in exclude:
            continue
        flag = f"--{prefix}-{f.name.replace('_', '-')}"
        hint, meta = _hints()[f.name], f.metadata
        text = f"{meta['help']} (default: {f.default})"
        if hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                               help=text)
            continue
        base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
        group.add_argument(flag, type=base, default=None, choices=meta["choices"], help=text,
                           metavar=None if meta["choices"] else base.__name__.upper())
    return group


def from_arguments(args: argparse.Namespace, prefix: str = "ntl",
                   base: Optional[NTLConfig] = None) -> NTLConfig:
    """``base`` (default: the defaults) with every flag of :func:`add_arguments` that was given."""
    given = {f.name: getattr(args, f"{prefix}_{f.name}") for f in fields(NTLConfig)
             if getattr(args, f"{prefix}_{f.name}", None) is not None}
    return (base or NTLConfig()).replace(**given)
