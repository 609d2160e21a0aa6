"""The model to pretrain: any Hugging Face causal-LM architecture, from a config JSON.

The file is a transformers config as a JSON object, ``{"model_type": "llama" | "qwen2" |
"mistral" | "gpt2" | ..., <that config's keys>}``; without ``model_type`` it is a Llama
(``configs/model/llama_tiny.json``). ``vocab_size`` always comes from the tokenizer (padded);
special-token ids the config holds that fall outside that vocab (GPT-2's 50256) are cleared.
"""
from __future__ import annotations

from typing import Any, Dict

from ..config import read_json_object

DEFAULT_MODEL_TYPE = "llama"
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def read_model_config(path: str) -> Dict[str, Any]:
    """The JSON object of ``path`` (errors name the file)."""
    return read_json_object(path, f"--model {path}")


def check_model_type(model_type: Any, path: str) -> str:
    """``model_type`` if transformers has a causal LM for it, else a ValueError naming it."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ValueError(f"--model {path}: model_type {model_type!r} is not a transformers "
                         f"architecture (e.g. llama, qwen2, mistral, gpt2)")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"--model {path}: model_type {model_type!r} has no causal-LM model "
                         f"(AutoModelForCausalLM)")
    return model_type


def model_config(path: str, vocab_size: int):
    """The transformers config of ``path`` (``AutoConfig.for_model``) with ``vocab_size``."""
    from transformers import CONFIG_MAPPING

    raw = dict(read_model_config(path))
    model_type = check_model_type(raw.pop("model_type", DEFAULT_MODEL_TYPE), path)
    config_class = CONFIG_MAPPING[model_type]
    defaults = config_class()
    for key in SPECIAL_IDS:  # e.g. GPT-2's 50256 in a 512-token vocab
        value = raw.get(key, getattr(defaults, key, None))
        if isinstance(value, int) and not 0 <= value < vocab_size:
            raw[key] = None
    raw["vocab_size"] = vocab_size
    return config_class(**raw)
