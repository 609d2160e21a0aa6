"""Checkpoints that survive a crash at any moment and refuse files they did not write.

Layout of ``output-dir/checkpoints``::

    step12/            committed: DeepSpeed's files, run_config.json and manifest.json
    latest             the name of the newest committed folder (replaced atomically)
    .tmp-step14/       a save in progress, or one a crash interrupted: never loaded
    zero_to_fp32.py    DeepSpeed's recovery scripts

Saving (:func:`save`, every rank): DeepSpeed writes into ``.tmp-stepN/stepN`` through the
verifying engine (:mod:`.engine`: each file fsynced and hashed by the rank that wrote it);
DeepSpeed's closing barrier means every rank has finished; rank 0 gathers the hashes, writes
``run_config.json`` and ``manifest.json`` (every file, its size and sha256), renames the folder to
``stepN``, replaces ``latest`` (temporary file + ``os.replace``, directories fsynced) and deletes
all but the newest ``keep`` checkpoints; a last broadcast tells every rank whether that worked.
A crash before the rename leaves only a ``.tmp-*`` folder; after it, a complete checkpoint.

Resuming (:func:`resume`): rank 0 checks the checkpoint ``latest`` names -- a folder directly
inside the checkpoint directory (no ``..``, absolute path or symlink out), every file listed in
its manifest with the right size and sha256, no file the manifest does not list, no symlink --
and falls back to the newest complete checkpoint (saying which and why). It compares the
training setup stored with it (:func:`run_config`) to the current one. Every file is then
loaded with ``torch.load(weights_only=True)`` (only tensors, containers and the few DeepSpeed
types of :func:`~.engine.safe_globals`), after its checksum is checked again by the rank
loading it.

One job per module: :mod:`.layout` (names, the error type), :mod:`.files` (digests, atomic
writes), :mod:`.manifest`, :mod:`.engine` (DeepSpeed's checkpoint engine, verified),
:mod:`.selection` (which checkpoint), :mod:`.run_setup`, :mod:`.commit` (save, prune), :mod:`.restore` (resume),
:mod:`.collectives`, and :mod:`.faults` (crash injection for the tests).
"""
from .engine import make_safe_engine, safe_engine, safe_globals
from .faults import FAULT_ENV, Faults
from .files import file_digest, fsync_dir, write_atomic
from .layout import LATEST, MANIFEST, RUN_CONFIG, CheckpointError, step_of
from .manifest import check_listed, read_manifest, verify
from .restore import resume
from .run_setup import DATA_ARGS, differences, run_config
from .commit import prune, save
from .selection import committed, read_latest, select

__all__ = ["CheckpointError", "DATA_ARGS", "FAULT_ENV", "Faults", "LATEST", "MANIFEST",
           "RUN_CONFIG", "check_listed", "committed", "differences", "file_digest",
           "fsync_dir", "make_safe_engine", "prune", "read_latest", "read_manifest", "resume",
           "run_config", "safe_engine", "safe_globals", "save", "select", "step_of", "verify",
           "write_atomic"]
