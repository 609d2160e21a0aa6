"""A sentencepiece tokenizer trained on the corpus (digits split), cached on disk."""
from __future__ import annotations

import hashlib
import io
import os
from typing import Optional

from .corpus import generate

# outside the installed package (a wheel's site-packages may be read-only)
DEFAULT_CACHE = os.environ.get("NTL_CACHE_DIR") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
    "ntl_deepspeed")


def train_tokenizer(vocab_size: int = 512, seed: int = 0, n_sentences: int = 20000,
                    cache_dir: Optional[str] = None) -> str:
    """Path of a Llama-style (BPE, byte fallback, split digits) sentencepiece model."""
    import sentencepiece as spm

    cache_dir = cache_dir or DEFAULT_CACHE
    key = hashlib.sha1(f"v1-{vocab_size}-{seed}-{n_sentences}".encode()).hexdigest()[:10]
    path = os.path.join(cache_dir, f"corpus_sp_{key}.model")
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(generate(n_sentences, seed)), model_writer=model,
        vocab_size=vocab_size, model_type="bpe", split_digits=True, byte_fallback=True,
        character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, num_threads=1,
        minloglevel=2)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, path)  # atomic: concurrent ranks never read a partial file
    return path
