"""The training setup stored with a checkpoint, and how two setups differ."""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from .files import file_digest

# trainer arguments that decide what is trained on (paths, not contents, for --data)
DATA_ARGS = ("data", "corpus_sentences", "seed", "eval_fraction", "eval_data", "eval_split")


def run_config(engine, args, ntl, tokenizer_path: Optional[str],
               extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What must not change when a run is resumed: the loss options (the ``"ntl"`` section),
    micro-batch size, gradient accumulation, sequence length, the model config, the tokenizer
    (sha256 of its file) and the data (:data:`DATA_ARGS`)."""
    from ...config import LOSS_FIELDS
    from ...numbers.token_sources import tokenizer_file

    with open(args.model) as f:
        model = json.load(f)
    tokenizer = None
    if tokenizer_path is not None:
        tokenizer = file_digest(tokenizer_file(tokenizer_path)[1])[1]
    config = {
        "ntl": {k: v for k, v in ntl.to_dict().items() if k in LOSS_FIELDS},
        "plain_ce": args.plain_ce,
        "micro_batch_size": engine.train_micro_batch_size_per_gpu(),
        "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
        "seq_len": args.seq_len,
        "model": model,
        "tokenizer_sha256": tokenizer,
        "data": {k: getattr(args, k) for k in DATA_ARGS},
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
