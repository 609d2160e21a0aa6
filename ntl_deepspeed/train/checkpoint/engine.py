"""DeepSpeed's torch checkpoint engine, made verifiable: hashes what it writes, loads only
files its manifest lists, with ``weights_only=True``."""
from __future__ import annotations

import io
import os
import pickle
import re
from typing import Dict, Optional, Tuple

import torch

from .faults import Faults
from .files import file_digest, write_synced
from .layout import CheckpointError
from .manifest import check_listed


def safe_globals() -> list:
    """The non-tensor types DeepSpeed 0.19.8 pickles into ZeRO checkpoints (found by loading
    real fp32/bf16 and AutoTP checkpoints with ``weights_only=True``): its ZeRO stage enum and
    its loss scalers (plain attribute bags)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


def _torch_engine_class():
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    return TorchCheckpointEngine


def first_line(e: BaseException) -> str:
    """The informative line of a loader's error (the refused global, if any)."""
    text = str(e).strip()
    hit = re.search(r"(Unsupported global: GLOBAL [\w.]+|unsupported GLOBAL [\w.]+[^\n]*|"
                    r"Unsupported operand [^\n]*)", text)
    return hit.group(1) if hit else (text.splitlines()[0] if text else type(e).__name__)


def make_safe_engine(config_params=None, faults: Optional[Faults] = None):
    """A ``SafeCheckpointEngine`` (the class is built lazily: DeepSpeed is imported only here)."""
    base = _torch_engine_class()

    class SafeCheckpointEngine(base):
        """DeepSpeed's torch checkpoint engine, but: every file written is fsynced and its size
        and sha256 recorded (for the manifest); every file read must be listed, with that size
        and sha256, in the manifest beside it, and is unpickled with ``weights_only=True``."""

        def __init__(self, config_params=None):
            super().__init__(config_params)
            self.faults = faults or Faults()
            self.written: Dict[str, Tuple[int, str]] = {}
            self.verified: Dict[Tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha

        def save(self, state_dict, path: str):
            n = len(self.written) + 1
            self.faults.hit(f"file{n}")
            if self.faults.wants(f"file{n}.mid"):  # a torn file, as a crash mid-write leaves
                buf = io.BytesIO()
                torch.save(state_dict, buf)
                write_synced(path, lambda f: f.write(buf.getvalue()[: len(buf.getvalue()) // 2]))
                self.faults.hit(f"file{n}.mid")
            write_synced(path, lambda f: torch.save(
                state_dict, f, _use_new_zipfile_serialization=self.zipfile_serialization))
            self.written[os.path.abspath(path)] = file_digest(path)
            self.faults.hit(f"file{n}.done")

        def load(self, path: str, map_location=None):
            check_listed(path, self.verified)
            try:
                with torch.serialization.safe_globals(safe_globals()):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as e:
                raise CheckpointError(f"{path}: refused to load: {first_line(e)} (only tensors "
                                      "and plain data are accepted: weights_only=True)") from None
            except (RuntimeError, ValueError, EOFError) as e:  # e.g. not a torch file
                raise CheckpointError(f"{path}: could not be loaded: {first_line(e)}") from None

    return SafeCheckpointEngine(config_params)


def safe_engine(engine):
    """Put a SafeCheckpointEngine on a DeepSpeed engine (once); refuse checkpoint engines we
    cannot make safe (DeepSpeed's fast/decoupled writers, DataStates)."""
    current = engine.checkpoint_engine
    if hasattr(current, "written"):
        return current
    if type(current) is not _torch_engine_class():
        raise CheckpointError(f"checkpoints need DeepSpeed's TorchCheckpointEngine (got "
                              f"{type(current).__name__}): remove the 'checkpoint.writer' / "
                              "'datastates' sections of the ds_config")
    engine.checkpoint_engine = make_safe_engine(engine._config)
    return engine.checkpoint_engine
