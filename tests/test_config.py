"""NTLConfig: the one schema -- defaults, strict types, choices, cross-field rules, the "ntl"
section of a DeepSpeed config (from_dict) and command-line flags (add_arguments)."""
import argparse
import dataclasses
import math
import re

import pytest

from ntl_deepspeed import NTLConfig
from ntl_deepspeed.config import add_arguments, as_config, from_arguments

FIELDS = [f.name for f in dataclasses.fields(NTLConfig)]


def test_defaults():
    c = NTLConfig()
    assert c.to_dict() == {
        "enabled": True, "weight": 0.3, "kind": "was", "mode": "digits", "reweigh": False,
        "squash_factor": None, "normalization": "micro_batch", "ignore_index": -100,
        "float_level": False, "check_finite": False, "check_inputs": False, "log_metrics": True,
        "fused_head": False, "fused_block_size": None, "fused_token_chunk": None,
        "backend": "auto"}
    assert c.active_weight == 0.3 and NTLConfig(enabled=False).active_weight == 0.0
    assert NTLConfig.from_dict({}) == c == as_config(None) == as_config({})
    assert as_config(c) is c
    with pytest.raises(TypeError, match="expected an NTLConfig or a dict"):
        as_config("was")


def test_ints_widen_to_float_and_round_trip():
    c = NTLConfig(weight=1, squash_factor=3)
    assert type(c.weight) is float and type(c.squash_factor) is float
    assert NTLConfig.from_dict(c.to_dict()) == c
    assert c.replace(kind="was", weight=0.5).weight == 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.weight = 2.0


@pytest.mark.parametrize("values, message", [
    ({"weight": "0.3"}, "ntl.weight: expected a number, got '0.3'"),
    ({"weight": True}, "ntl.weight: expected a number, got True"),
    ({"weight": None}, "ntl.weight: must be set"),
    ({"reweigh": "yes"}, "ntl.reweigh: expected true or false, got 'yes'"),
    ({"reweigh": 1}, "ntl.reweigh: expected true or false, got 1"),
    ({"enabled": None}, "ntl.enabled: must be set"),
    ({"fused_block_size": 1.5}, "ntl.fused_block_size: expected an integer, got 1.5"),
    ({"fused_token_chunk": "64"}, "ntl.fused_token_chunk: expected an integer, got '64'"),
    ({"ignore_index": True}, "ntl.ignore_index: expected an integer, got True"),
    ({"ignore_index": -100.0}, "ntl.ignore_index: expected an integer, got -100.0"),
    ({"kind": 3}, "ntl.kind: expected a string, got 3"),
])
def test_strict_types(values, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        NTLConfig.from_dict(values)
    with pytest.raises(ValueError, match=re.escape(message)):  # the Python constructor too
        NTLConfig(**values)


@pytest.mark.parametrize("values, message", [
    ({"weight": math.nan}, "ntl.weight: must be finite, got nan"),
    ({"weight": math.inf}, "ntl.weight: must be finite, got inf"),
    ({"squash_factor": math.inf}, "ntl.squash_factor: must be finite, got inf"),
    ({"squash_factor": -math.inf}, "ntl.squash_factor: must be finite"),
    ({"weight": -0.1}, "ntl.weight=-0.1: must be >= 0"),
    ({"squash_factor": 1.0}, "ntl.squash_factor=1.0: must be > 1"),
    ({"fused_block_size": 0}, "ntl.fused_block_size=0: must be >= 1"),
    ({"fused_token_chunk": -4}, "ntl.fused_token_chunk=-4: must be >= 1"),
])
def test_non_finite_and_bounds(values, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        NTLConfig.from_dict(values)


@pytest.mark.parametrize("name, bad", [("kind", "banana"), ("mode", "roman"),
                                       ("normalization", "batch"), ("backend", "cuda"),
                                       ("kind", "WAS")])
def test_choices(name, bad):
    with pytest.raises(ValueError, match=re.escape(f"ntl.{name}={bad!r}: expected one of (")):
        NTLConfig(**{name: bad})


def test_unknown_keys_suggest_the_closest_name():
    with pytest.raises(ValueError, match="ntl.wieght: unknown option; did you mean 'weight'"):
        NTLConfig.from_dict({"wieght": 0.3})
    with pytest.raises(ValueError, match="did you mean 'squash_factor'"):
        NTLConfig.from_dict({"kind": "was", "squash_fator": 3.0})
    with pytest.raises(ValueError, match="ntl.lambda: unknown option; known: \\['enabled'"):
        NTLConfig.from_dict({"kind": "was", "lambda": 0.3})
    with pytest.raises(ValueError, match='"ntl" must be an object, got list'):
        NTLConfig.from_dict([("weight", 0.3)])
    with pytest.raises(TypeError):  # the Python constructor: a plain TypeError
        NTLConfig(wieght=0.3)


def test_cross_field_rules():
    with pytest.raises(ValueError, match="squash_factor applies to kind 'was' only"):
        NTLConfig(kind="mse", squash_factor=3.0)
    with pytest.raises(ValueError, match="float_level applies to kind 'number_level' only"):
        NTLConfig(kind="was", float_level=True)
    with pytest.raises(ValueError, match="kind 'number_level' needs mode 'digits'"):
        NTLConfig(kind="number_level", mode="integers")
    with pytest.raises(ValueError, match="squash_factor applies to kind 'was' only"):
        NTLConfig(squash_factor=3.0).replace(kind="huber")  # replace re-validates
    NTLConfig(kind="was", squash_factor=3.0)
    NTLConfig(kind="number_level", float_level=True)
    NTLConfig(kind="l1", mode="floats")


# ---------------------------------------------------------------------- command line
def parser(**kwargs):
    p = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(p, **kwargs)
    return p


def flags_for(config: NTLConfig, prefix="ntl"):
    """The command line that sets every field of ``config`` explicitly."""
    argv = []
    for name, value in config.to_dict().items():
        flag = f"--{prefix}-{name.replace('_', '-')}"
        if isinstance(value, bool):
            argv.append(flag if value else flag.replace("--", "--no-", 1))
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def test_every_field_has_a_flag():
    p = parser()
    options = {o for a in p._actions for o in a.option_strings}
    for f in dataclasses.fields(NTLConfig):
        flag = f"--ntl-{f.name.replace('_', '-')}"
        assert flag in options, flag
        if f.type in ("bool", bool):
            assert flag.replace("--", "--no-", 1) in options
    # nothing given: every attribute None, i.e. the base config unchanged
    args = p.parse_args([])
    assert all(getattr(args, f"ntl_{n}") is None for n in FIELDS)
    assert from_arguments(args) == NTLConfig()


@pytest.mark.parametrize("config", [
    NTLConfig(),
    NTLConfig(enabled=False, weight=1.5, kind="was", mode="floats", reweigh=True,
              squash_factor=2.5, normalization="global", ignore_index=-1, check_finite=True,
              check_inputs=True, log_metrics=False, fused_head=True, fused_block_size=256,
              fused_token_chunk=64, backend="torch"),
    NTLConfig(kind="number_level", float_level=True, normalization="token"),
])
def test_command_line_round_trip(config):
    args = parser().parse_args(flags_for(config))
    assert from_arguments(args) == config
    assert from_arguments(args, base=NTLConfig(weight=9.0, kind="huber")) == config


def test_only_given_flags_override_the_base():
    base = NTLConfig(weight=0.7, kind="mse", reweigh=True, fused_block_size=128)
    args = parser().parse_args(["--ntl-weight", "0.1", "--no-ntl-reweigh", "--ntl-check-inputs"])
    got = from_arguments(args, base=base)
    assert got == base.replace(weight=0.1, reweigh=False, check_inputs=True)
    assert got.kind == "mse" and got.fused_block_size == 128
    # without a base: the defaults
    assert from_arguments(args) == NTLConfig(weight=0.1, reweigh=False, check_inputs=True)


def test_command_line_prefix_exclude_and_errors():
    p = parser(prefix="loss", exclude=("backend", "fused_head"))
    options = {o for a in p._actions for o in a.option_strings}
    assert "--loss-weight" in options and "--ntl-weight" not in options
    assert "--loss-backend" not in options and "--no-loss-fused-head" not in options
    args = p.parse_args(["--loss-kind", "l1", "--loss-fused-block-size", "512"])
    assert from_arguments(args, prefix="loss") == NTLConfig(kind="l1", fused_block_size=512)
    with pytest.raises(argparse.ArgumentError):  # not a choice
        p.parse_args(["--loss-kind", "banana"])
    with pytest.raises(argparse.ArgumentError):  # not an integer
        p.parse_args(["--loss-fused-block-size", "1.5"])
    # parsed, then rejected by the schema with the field's name
    with pytest.raises(ValueError, match="ntl.weight: must be finite, got nan"):
        from_arguments(p.parse_args(["--loss-weight", "nan"]), prefix="loss")
    with pytest.raises(ValueError, match="squash_factor applies to kind 'was' only"):
        from_arguments(p.parse_args(["--loss-kind", "mse", "--loss-squash-factor", "3"]),
                       prefix="loss")
