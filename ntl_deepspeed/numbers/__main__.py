"""``python -m ntl_deepspeed.numbers TOKENIZER [--mode M] [--text T]``: show a tokenizer's
number tokens and which positions of a text would receive NTL."""
from __future__ import annotations

import argparse
import math
from typing import Any, List, Optional, Sequence, Tuple

from ..config import MODES
from .token_sources import tokenizer_file
from .vocab import NumberVocab


def _describe(vocab: NumberVocab, tokenizer: Any, text: Optional[str]) -> str:
    lines = [repr(vocab)]
    ids = vocab.number_ids.tolist()
    examples = ids[:8] + (ids[-4:] if len(ids) > 12 else [])
    lines.append("examples: " + ", ".join(f"{i}:{vocab.number_tokens[i]!r}={vocab.values[i]:g}"
                                           for i in examples))
    if text is not None:
        token_ids, pieces = _encode(tokenizer, text)
        marked = [f"[{p}={vocab.values[i]:g}]" if i < vocab.vocab_size and
                  not math.isnan(vocab.values[i]) else p for i, p in zip(token_ids, pieces)]
        hits = sum(m.startswith("[") for m in marked)
        lines.append(f"text: {len(token_ids)} tokens, {hits} would receive NTL")
        lines.append(" ".join(marked))
    return "\n".join(lines)


def _encode(tokenizer: str, text: str) -> Tuple[List[int], List[str]]:
    kind, path = tokenizer_file(tokenizer)
    if kind == "json":
        from tokenizers import Tokenizer

        enc = Tokenizer.from_file(path).encode(text, add_special_tokens=False)
        return enc.ids, enc.tokens
    if kind == "tiktoken":
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        ranks = load_tiktoken_bpe(path)
        enc = tiktoken.Encoding("file", pat_str=r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",
                                mergeable_ranks=ranks, special_tokens={})
        ids = enc.encode(text)
        return ids, [enc.decode([i]) for i in ids]
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=path)
    ids = sp.encode(text)
    return ids, [sp.id_to_piece(i) for i in ids]


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ntl_deepspeed.numbers",
                                 description="Show the number tokens of a tokenizer.")
    ap.add_argument("tokenizer", help="tokenizer.json / directory / sentencepiece .model / .tiktoken")
    ap.add_argument("--mode", choices=MODES, default="digits")
    ap.add_argument("--vocab-size", type=int, default=None, help="padded model vocab size")
    ap.add_argument("--text", default=None, help="sample text: which positions would get NTL")
    args = ap.parse_args(argv)
    vocab = NumberVocab.from_tokenizer(args.tokenizer, mode=args.mode, vocab_size=args.vocab_size)
    print(_describe(vocab, args.tokenizer, args.text))


if __name__ == "__main__":
    main()
