"""Check a training command before any rank starts.

    python -m ntl_deepspeed.train.preflight <the trainer's arguments>

Parses the arguments exactly as the trainer does (:func:`ntl_deepspeed.train.cli.parse_args`)
and checks the files they name: the ds_config (valid JSON, its ``"ntl"`` section, a
``--ntl-weight`` override, AutoTP's vocab-parallel head in the installed DeepSpeed), the model
config (exists, a JSON object, a known ``model_type``), ``--data`` / ``--eval-data`` (exist,
hold .txt / .jsonl files), the tokenizer if one is given (it loads and can encode text) and,
with ``--resume``, the checkpoint directory. A problem prints one line ``error: ...`` naming the
file and key on stderr and exits 2; otherwise it prints nothing and exits 0. The launchers in
``launch/`` run it once before starting the ranks, so a typo costs seconds, not a job start.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import Optional, Sequence

from ..config import read_json_object


class PreflightError(Exception):
    """A problem with the command, in one line."""


def _parse(argv: Optional[Sequence[str]]):
    from .cli import parse_args

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return parse_args(argv)
    except SystemExit as e:
        if not e.code:  # --help: already printed to stdout
            raise
        lines = [line for line in captured.getvalue().splitlines() if line.strip()]
        last = lines[-1] if lines else "invalid arguments"
        raise PreflightError(last.split("error: ", 1)[-1]) from None


def _read_json(path: str, what: str) -> dict:
    try:
        return read_json_object(path, f"{what} {path}")
    except ValueError as e:
        raise PreflightError(str(e)) from None


def check_deepspeed_config(path: str, ntl_weight: Optional[float] = None) -> None:
    from ..integrations.deepspeed import autotp_size, check_deepspeed_for_autotp, split_config

    _read_json(path, "--deepspeed_config")  # missing file / bad JSON, named
    try:
        ds_config, ntl = split_config(path)
    except ValueError as e:
        raise PreflightError(str(e)) from None
    if ntl_weight is not None:
        try:
            ntl.replace(weight=ntl_weight)
        except ValueError as e:
            raise PreflightError(f"--ntl-weight: {e}") from None
    try:
        tp = autotp_size(ds_config)
    except (TypeError, ValueError) as e:
        raise PreflightError(f"{path}: tensor_parallel.autotp_size: {e}") from None
    if tp > 1:  # imports DeepSpeed: only when it matters
        try:
            check_deepspeed_for_autotp(ds_config)
        except RuntimeError as e:
            raise PreflightError(f"{path}: {e}") from None


def check_sequence_parallel(args) -> None:
    """``--sequence-parallel`` / ``"sequence_parallel_size"``: agreement and the options it
    does not combine with (the world size is checked once the ranks run)."""
    from ..integrations.deepspeed import autotp_size, split_config
    from .sequence_parallel import check_arguments, sequence_parallel_size

    ds_config = split_config(args.deepspeed_config)[0]
    try:
        size = sequence_parallel_size(args, ds_config)
        check_arguments(args, size, args.seq_len, size, autotp_size(ds_config))
    except ValueError as e:
        raise PreflightError(str(e)) from None


def check_model_config(path: str) -> None:
    config = _read_json(path, "--model")
    if "model_type" in config:  # default: llama
        from .models import check_model_type

        try:
            check_model_type(config["model_type"], path)
        except ValueError as e:
            raise PreflightError(str(e)) from None


def check_data(paths, option: str) -> None:
    """Every path exists and holds .txt / .jsonl data (the files are read by the ranks)."""
    from .data.documents import list_files

    try:
        list_files(paths, option)
    except (OSError, ValueError) as e:
        raise PreflightError(str(e)) from None


def check_tokenizer(path: str) -> None:
    from .data.encode import text_encoder

    try:
        encode, _ = text_encoder(path)
        encode("I paid 48 dollars")
    except FileNotFoundError as e:  # its message names the path
        raise PreflightError(f"--tokenizer: {e}") from None
    except Exception as e:  # noqa: BLE001 - any failure to load is the user's file
        raise PreflightError(f"--tokenizer {path}: {e}") from None


def check(argv: Optional[Sequence[str]] = None) -> None:
    """Raise :class:`PreflightError` on the first problem of a trainer command line."""
    args = _parse(argv)
    check_deepspeed_config(args.deepspeed_config, args.ntl_weight)
    check_sequence_parallel(args)
    check_model_config(args.model)
    for option in ("data", "eval_data"):
        paths = getattr(args, option)  # the two path options, by name
        if paths:
            check_data(paths, "--" + option.replace("_", "-"))
    if args.tokenizer is not None:
        check_tokenizer(args.tokenizer)
    if args.resume:
        ckpt = os.path.join(args.output_dir, "checkpoints")
        if not os.path.isdir(ckpt):
            raise PreflightError(f"--resume: no checkpoint directory {ckpt}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        check(argv)
    except PreflightError as e:
        message = " ".join(str(e).split())  # one line, whatever the message held
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
