"""Turn a tokenizer file into ``(encode(text) -> ids, eos_id)`` for building training data."""
from __future__ import annotations

from typing import Callable, List, Tuple

from ...numbers.token_sources import tokenizer_file

EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>")

Encoder = Tuple[Callable[[str], List[int]], int]


def _sentencepiece(path: str) -> Encoder:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=path)
    if sp.eos_id() < 0:
        raise ValueError(f"{path}: the sentencepiece model has no EOS piece (eos_id = -1)")
    return (lambda text: sp.encode(text)), sp.eos_id()


def _tokenizer_json(path: str) -> Encoder:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    vocab = tok.get_vocab(with_added_tokens=True)
    eos = next((vocab[t] for t in EOS_CANDIDATES if t in vocab), None)
    if eos is None:
        raise ValueError(f"{path}: no end-of-text token among {EOS_CANDIDATES}")
    return (lambda text: tok.encode(text, add_special_tokens=False).ids), eos


def text_encoder(path: str) -> Encoder:
    """A sentencepiece ``.model``, a ``tokenizer.json`` or a directory holding one of them."""
    kind, path = tokenizer_file(path)
    if kind == "json":
        return _tokenizer_json(path)
    if kind == "tiktoken":
        raise ValueError(f"{path}: a *.tiktoken file has no pre-tokenizer pattern, so it cannot "
                         "encode training text here; pass a sentencepiece .model or tokenizer.json")
    return _sentencepiece(path)


def text_decoder(path: str) -> Callable[[List[int]], str]:
    """``decode(ids) -> text`` for the same tokenizer files as :func:`text_encoder`."""
    kind, path = tokenizer_file(path)
    if kind == "json":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(path)
        return lambda ids: tok.decode(list(ids), skip_special_tokens=True)
    if kind == "tiktoken":
        raise ValueError(f"{path}: a *.tiktoken file cannot be used for generation here")
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=path)
    return lambda ids: sp.decode(list(ids))
