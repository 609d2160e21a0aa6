"""Checkpoints that survive a crash at any moment and refuse files they did not write.

Layout of ``output-dir/checkpoints``::

    step12/            committed: DeepSpeed's files, run_config.json and manifest.json
    latest             the name of the newest committed folder (replaced atomically)
    .tmp-step14/       a save in progress, or one a crash interrupted: never loaded
    zero_to_fp32.py    DeepSpeed's recovery scripts

Saving (:func:`save`, every rank): DeepSpeed writes into ``.tmp-stepN/stepN`` through
:class:`SafeCheckpointEngine` (each file fsynced and hashed by the rank that wrote it);
DeepSpeed's closing barrier means every rank has finished; rank 0 gathers the hashes, writes
``run_config.json`` and ``manifest.json`` (every file, its size and sha256), renames the folder to
``stepN``, replaces ``latest`` (temporary file + ``os.replace``, directories fsynced) and deletes
all but the newest ``keep`` checkpoints; a last broadcast tells every rank whether that worked.
A crash before the rename leaves only a ``.tmp-*`` folder; after it, a complete checkpoint.

Resuming (:func:`resume`): rank 0 checks the checkpoint ``latest`` names -- a folder directly
inside the checkpoint directory (no ``..``, absolute path or symlink out), every file listed in
its manifest with the right size and sha256, no file the manifest does not list, no symlink --
and falls back to the newest complete checkpoint (saying which and why on stdout). It compares
the training setup stored with it (:func:`run_config`) to the current one. Every file is then
loaded with ``torch.load(weights_only=True)`` (only tensors, containers and the few DeepSpeed
types of :data:`SAFE_GLOBALS`), after its checksum is checked again by the rank loading it.

Test hook: ``NTL_DEBUG_CHECKPOINT_FAULT="rank:save:point"`` SIGKILLs ``rank`` at ``point`` of its
``save``-th checkpoint (1-based): ``fileN`` (before its N-th file), ``fileN.mid`` (half of it
written), ``fileN.done``, ``saved`` (all ranks done), ``manifest``, ``renamed``, ``latest``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import signal
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

MANIFEST = "manifest.json"
RUN_CONFIG = "run_config.json"
LATEST = "latest"
STAGING = ".tmp-"
RETIRED = ".old-"
FORMAT = "ntl-deepspeed-checkpoint/1"
FAULT_ENV = "NTL_DEBUG_CHECKPOINT_FAULT"
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_STEP = re.compile(r"^step(\d+)$")
_CHUNK = 1 << 22
# trainer arguments that decide what is trained on (paths, not contents, for --data)
DATA_ARGS = ("data", "corpus_sentences", "seed", "eval_fraction", "eval_data", "eval_split")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, tampered with, or from another setup."""


# ---------------------------------------------------------------------- files
def file_digest(path: str) -> Tuple[int, str]:
    """(size, sha256 hex) of a file, read in chunks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                return size, h.hexdigest()
            h.update(chunk)
            size += len(chunk)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, ``os.replace`` it onto
    ``path`` and fsync the directory: readers see the old or the new content, never a part."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


# ---------------------------------------------------------------------- fault injection (tests)
class Faults:
    """``NTL_DEBUG_CHECKPOINT_FAULT="rank:save:point"``: SIGKILL that rank at that point."""

    def __init__(self, spec: Optional[str] = None):
        spec = os.environ.get(FAULT_ENV, "") if spec is None else spec
        self.points = set()
        for item in filter(None, (s.strip() for s in spec.split(","))):
            rank, save, point = item.split(":", 2)
            self.points.add((int(rank), int(save), point))
        self.save_no = 0

    @staticmethod
    def _rank() -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    def wants(self, point: str) -> bool:
        return (self._rank(), self.save_no, point) in self.points

    def hit(self, point: str) -> None:
        if self.wants(point):
            print(f"[{FAULT_ENV}] rank {self._rank()} killed at {point} of save "
                  f"{self.save_no}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------- the checkpoint engine
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


def make_safe_engine(config_params=None, faults: Optional[Faults] = None):
    """A :class:`SafeCheckpointEngine` (built lazily: DeepSpeed is imported only here)."""
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
                with open(path, "wb") as f:
                    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                self.faults.hit(f"file{n}.mid")
            with open(path, "wb") as f:
                torch.save(state_dict, f, _use_new_zipfile_serialization=self.zipfile_serialization)
                f.flush()
                os.fsync(f.fileno())
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


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    hit = re.search(r"(Unsupported global: GLOBAL [\w.]+|unsupported GLOBAL [\w.]+[^\n]*|"
                    r"Unsupported operand [^\n]*)", text)
    return hit.group(1) if hit else (text.splitlines()[0] if text else type(e).__name__)


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


# ---------------------------------------------------------------------- manifests
def read_manifest(folder: str) -> Dict[str, Any]:
    path = os.path.join(folder, MANIFEST)
    if os.path.islink(path) or not os.path.isfile(path):
        raise CheckpointError("no manifest.json (incomplete, or not written by this trainer)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"unreadable manifest.json ({e})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != FORMAT or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int)
            and isinstance(v.get("sha256"), str) for v in files.values()):
        raise CheckpointError("manifest.json is not a checkpoint manifest of this trainer")
    for name in files:
        parts = name.split("/")
        if os.path.isabs(name) or any(p in ("", ".", "..") for p in parts):
            raise CheckpointError(f"manifest.json lists an unsafe path {name!r}")
    return manifest


def _folder_files(folder: str) -> List[str]:
    """Every entry under ``folder`` (relative, '/'-separated); symlinks are refused."""
    found = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, folder).replace(os.sep, "/")
            if os.path.islink(full):
                raise CheckpointError(f"{rel} is a symlink (refused)")
            if name in files:
                found.append(rel)
    return found


def verify(folder: str, cache: Optional[dict] = None) -> Dict[str, Any]:
    """The manifest of ``folder`` after checking it against the files: same set (no file the
    manifest does not list), sizes and sha256. Raises :class:`CheckpointError` with the reason."""
    if os.path.islink(folder) or not os.path.isdir(folder):
        raise CheckpointError("not a folder")
    manifest = read_manifest(folder)
    files = manifest["files"]
    present = set(_folder_files(folder)) - {MANIFEST}
    extra = sorted(present - set(files))
    if extra:
        raise CheckpointError(f"{extra[0]} is not in the manifest (not written by this trainer)"
                              + (f", and {len(extra) - 1} more" if len(extra) > 1 else ""))
    missing = sorted(set(files) - present)
    if missing:
        raise CheckpointError(f"{missing[0]} is missing")
    if RUN_CONFIG not in files:
        raise CheckpointError(f"no {RUN_CONFIG}")
    for name, entry in sorted(files.items()):
        _check_file(os.path.join(folder, *name.split("/")), name, entry, cache)
    return manifest


def _check_file(path: str, name: str, entry: dict, cache: Optional[dict]) -> None:
    st = os.stat(path)
    if st.st_size != entry["size"]:
        raise CheckpointError(f"{name}: {st.st_size} bytes, the manifest says {entry['size']} "
                              "(truncated or replaced)")
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    digest = cache.get(key) if cache is not None else None
    if digest is None:
        digest = file_digest(path)[1]
        if cache is not None:
            cache[key] = digest
    if digest != entry["sha256"]:
        raise CheckpointError(f"{name}: sha256 mismatch (corrupted or modified)")


def check_listed(path: str, cache: Optional[dict] = None) -> None:
    """Before reading a checkpoint file: it must be listed, with its size and sha256, in the
    manifest of its checkpoint folder."""
    folder, name = os.path.split(os.path.abspath(path))
    for _ in range(3):  # the file may sit in a subfolder of the checkpoint
        if os.path.isfile(os.path.join(folder, MANIFEST)):
            break
        folder, sub = os.path.split(folder)
        name = f"{sub}/{name}"
    try:
        manifest = read_manifest(folder)
        entry = manifest["files"].get(name)
        if entry is None:
            raise CheckpointError("not in the manifest (not written by this trainer)")
        _check_file(path, name, entry, cache)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


# ---------------------------------------------------------------------- which checkpoint
def step_of(tag: str) -> Optional[int]:
    m = _STEP.match(tag)
    return int(m.group(1)) if m else None


def read_latest(ckpt_dir: str) -> str:
    """The tag ``latest`` names, after checking that it is a folder directly inside
    ``ckpt_dir`` (no path separators, ``..``, absolute paths or symlinks out)."""
    path = os.path.join(ckpt_dir, LATEST)
    if not os.path.lexists(path):
        raise CheckpointError("there is no 'latest' file")
    if os.path.islink(path) or not os.path.isfile(path):
        raise CheckpointError("'latest' is not a regular file")
    with open(path, "rb") as f:
        raw = f.read(256)
    try:
        tag = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError("'latest' is not text") from None
    if not _TAG.match(tag) or tag.startswith(".") or tag == LATEST:
        raise CheckpointError(f"'latest' names {tag!r}, not a checkpoint folder inside "
                              f"{ckpt_dir} (refused)")
    folder = os.path.join(ckpt_dir, tag)
    if os.path.islink(folder) or os.path.dirname(os.path.realpath(folder)) != \
            os.path.realpath(ckpt_dir):
        raise CheckpointError(f"'latest' names {tag!r}, which leads outside {ckpt_dir} (refused)")
    return tag


def committed(ckpt_dir: str) -> List[str]:
    """Folders named ``stepN`` (newest first); complete or not."""
    try:
        names = os.listdir(ckpt_dir)
    except FileNotFoundError:
        return []
    tags = [n for n in names if step_of(n) is not None
            and os.path.isdir(os.path.join(ckpt_dir, n))
            and not os.path.islink(os.path.join(ckpt_dir, n))]
    return sorted(tags, key=step_of, reverse=True)


def select(ckpt_dir: str, cache: Optional[dict] = None,
           log: Callable[[str], None] = print) -> Tuple[str, Dict[str, Any]]:
    """``(tag, manifest)`` of the checkpoint to resume from: the one ``latest`` names if it is
    complete, else the newest complete one (``log`` says which and why)."""
    problems, named = [], None
    try:
        named = read_latest(ckpt_dir)
        return named, verify(os.path.join(ckpt_dir, named), cache)
    except CheckpointError as e:
        latest_problem = f"'latest' names {named}, but {e}" if named else str(e)
        problems.append(latest_problem)
    for candidate in committed(ckpt_dir):
        if candidate == named:
            continue
        try:
            manifest = verify(os.path.join(ckpt_dir, candidate), cache)
        except CheckpointError as e:
            problems.append(f"{candidate}: {e}")
            continue
        log(f"--resume: {latest_problem}; resuming from {candidate}, the newest complete "
            f"checkpoint in {ckpt_dir}" + (f" (skipped: {'; '.join(problems[1:])})"
                                           if len(problems) > 1 else ""))
        return candidate, manifest
    raise CheckpointError(f"--resume: no complete checkpoint in {ckpt_dir}: "
                          + "; ".join(problems))


# ---------------------------------------------------------------------- setups
def run_config(engine, args, ntl, tokenizer_path: Optional[str],
               extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What must not change when a run is resumed: the loss options (the ``"ntl"`` section),
    micro-batch size, gradient accumulation, sequence length, the model config, the tokenizer
    (sha256 of its file) and the data (:data:`DATA_ARGS`)."""
    from ..config import LOSS_FIELDS
    from ..numbers.token_sources import tokenizer_file

    with open(args.model) as f:
        model = json.load(f)
    tokenizer = None
    if tokenizer_path is not None:
        tokenizer = file_digest(tokenizer_file(tokenizer_path)[1])[1]
    config = {
        "ntl": {k: v for k, v in ntl.to_dict().items() if k in LOSS_FIELDS},
        "plain_ce": bool(getattr(args, "plain_ce", False)),
        "micro_batch_size": engine.train_micro_batch_size_per_gpu(),
        "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
        "seq_len": args.seq_len,
        "model": model,
        "tokenizer_sha256": tokenizer,
        "data": {k: getattr(args, k) for k in DATA_ARGS if hasattr(args, k)},
    }
    config.update(extra or {})
    return json.loads(json.dumps(config))  # what the JSON file holds (tuples become lists)


def differences(old: Any, new: Any, prefix: str = "") -> List[str]:
    """``key: old -> new`` for every leaf that differs."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out.append(f"{name}: (absent) -> {new[key]!r}")
            elif key not in new:
                out.append(f"{name}: {old[key]!r} -> (absent)")
            else:
                out.extend(differences(old[key], new[key], name))
        return out
    return [] if old == new else [f"{prefix or 'value'}: {old!r} -> {new!r}"]


# ---------------------------------------------------------------------- collective helpers
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _broadcast(obj):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ---------------------------------------------------------------------- save
def save(engine, ckpt_dir: str, step: int, client_state: Dict[str, Any],
         config: Dict[str, Any], keep: int = 3, log: Callable[[str], None] = print) -> str:
    """Save and commit checkpoint ``step{step}`` (collective: every rank calls it). Returns its
    folder. ``keep``: how many complete checkpoints to keep (0: all)."""
    ce = safe_engine(engine)
    ce.faults.save_no += 1
    tag = f"step{step}"
    staging = os.path.join(ckpt_dir, STAGING + tag)
    if _rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # a crashed attempt at the same step
    _barrier()
    ce.written = {}
    engine.save_checkpoint(staging, tag=tag, client_state=client_state, save_latest=False)
    ce.faults.hit("saved")
    written = _gather(ce.written)  # after DeepSpeed's closing barrier: every file is on disk
    error = None
    if _rank() == 0:
        try:
            _commit(ckpt_dir, staging, tag, step, written, config, keep, ce.faults)
        except Exception as e:  # noqa: BLE001 - every rank must hear about it
            error = f"saving checkpoint {tag} failed: {type(e).__name__}: {e}"
    error = _broadcast(error)
    if error:
        raise CheckpointError(error)
    if _rank() == 0:
        log(f"checkpoint {os.path.join(ckpt_dir, tag)} saved")
    return os.path.join(ckpt_dir, tag)


def _commit(ckpt_dir: str, staging: str, tag: str, step: int, written: List[dict],
            config: Dict[str, Any], keep: int, faults: Faults) -> None:
    folder = os.path.join(staging, tag)
    write_atomic(os.path.join(folder, RUN_CONFIG),
                 json.dumps(config, indent=1, sort_keys=True).encode())
    hashes = {path: digest for per_rank in written for path, digest in per_rank.items()}
    files = {}
    for rel in _folder_files(folder):
        full = os.path.abspath(os.path.join(folder, *rel.split("/")))
        size, sha = hashes.get(full) or file_digest(full)  # files DeepSpeed copied itself
        files[rel] = {"size": size, "sha256": sha}
    manifest = {"format": FORMAT, "tag": tag, "step": step, "created": time.time(),
                "files": files}
    write_atomic(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=1).encode())
    faults.hit("manifest")
    final = os.path.join(ckpt_dir, tag)
    retired = os.path.join(ckpt_dir, RETIRED + tag)
    if os.path.lexists(final):  # the same step saved again (after falling back): replace it
        shutil.rmtree(retired, ignore_errors=True)
        os.rename(final, retired)
    os.rename(folder, final)
    fsync_dir(ckpt_dir)
    faults.hit("renamed")
    for name in os.listdir(staging):  # DeepSpeed's recovery scripts, beside the checkpoints
        if os.path.isfile(os.path.join(staging, name)):
            os.replace(os.path.join(staging, name), os.path.join(ckpt_dir, name))
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(retired, ignore_errors=True)
    write_atomic(os.path.join(ckpt_dir, LATEST), tag.encode())
    faults.hit("latest")
    prune(ckpt_dir, keep, protect=tag)


def prune(ckpt_dir: str, keep: int, protect: Optional[str] = None) -> List[str]:
    """Delete all but the newest ``keep`` checkpoints with a manifest (0: keep all), never
    ``protect``, and leftovers of interrupted saves. Returns what was deleted."""
    removed = []
    for name in os.listdir(ckpt_dir):
        if name.startswith((STAGING, RETIRED)) and name != STAGING + (protect or ""):
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
            removed.append(name)
    if keep > 0:
        complete = [t for t in committed(ckpt_dir)
                    if os.path.isfile(os.path.join(ckpt_dir, t, MANIFEST))]
        for tag in complete[keep:]:
            if tag != protect:
                shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)
                removed.append(tag)
    return removed


# ---------------------------------------------------------------------- resume
def resume(engine, ckpt_dir: str, config: Dict[str, Any], allow_change: bool = False,
           log: Callable[[str], None] = print) -> Tuple[str, Dict[str, Any]]:
    """Load the checkpoint to resume from into ``engine`` (collective). Returns ``(folder,
    client_state)``. Raises :class:`CheckpointError` (on every rank) when there is no complete
    checkpoint, or when its setup differs from ``config`` and ``allow_change`` is False."""
    ce = safe_engine(engine)
    universal = getattr(engine, "load_universal_checkpoint", None)
    if callable(universal) and universal():
        raise CheckpointError("--resume: DeepSpeed loads universal checkpoints with its own "
                              "torch.load(weights_only=False), bypassing the verified loader: "
                              "remove checkpoint.load_universal from the ds_config")
    decision = None
    if _rank() == 0:
        try:
            tag, _ = select(ckpt_dir, ce.verified, log)
            with open(os.path.join(ckpt_dir, tag, RUN_CONFIG)) as f:
                stored = json.load(f)
            decision = {"tag": tag, "changes": differences(stored, config)}
        except (CheckpointError, OSError, ValueError) as e:
            decision = {"error": str(e)}
    decision = _broadcast(decision)
    if "error" in decision:
        raise CheckpointError(decision["error"])
    tag, changes = decision["tag"], decision["changes"]
    folder = os.path.join(ckpt_dir, tag)
    if changes and not allow_change:
        raise CheckpointError(
            f"--resume: {folder} was trained with a different setup: " + "; ".join(changes)
            + ". Resume with the same setup, or pass --allow-config-change")
    if changes and _rank() == 0:
        log(f"--allow-config-change: resuming {folder} with a changed setup: "
            + "; ".join(changes))
    path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag)
    if path is None:
        raise CheckpointError(f"--resume: DeepSpeed could not load {folder}")
    if _rank() == 0:
        log(f"--resume: continuing from {folder}")
    return folder, client_state
