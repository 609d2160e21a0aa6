"""Everything a run writes lives under ``--output-dir``; the summary names every file.

Written there: ``metrics.jsonl`` (training rows; evaluation rows carry ``"split": "eval"``),
``run_info.json``, ``curves.png``, ``generation.json`` (``--generate-eval``),
``checkpoints/``, and DeepSpeed's monitor output: the ds_config's ``csv_monitor`` and
``tensorboard`` ``output_path`` are rewritten to ``<output-dir>/monitor`` and
``<output-dir>/tensorboard`` (their ``job_name`` subdirectory is kept).
"""
from __future__ import annotations

import copy
import os
from typing import List

MONITOR_DIRS = {"csv_monitor": "monitor", "tensorboard": "tensorboard"}


def redirect_monitors(ds_config: dict, output_dir: str) -> dict:
    """A copy of ``ds_config`` whose monitors write under ``output_dir``."""
    config = copy.deepcopy(ds_config)
    for section, sub in MONITOR_DIRS.items():
        if isinstance(config.get(section), dict):
            config[section]["output_path"] = os.path.join(output_dir, sub)
    return config


def files_written(output_dir: str, since: float) -> List[str]:
    """Files under ``output_dir`` modified at or after ``since`` (relative paths, sorted)."""
    found = []
    for root, dirs, names in os.walk(output_dir):
        dirs.sort()
        for name in names:
            path = os.path.join(root, name)
            try:
                if os.path.getmtime(path) >= since - 1.0:
                    found.append(os.path.relpath(path, output_dir))
            except OSError:
                pass
    return sorted(found)
