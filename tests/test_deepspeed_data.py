"""Training data of launch/pretrain.py from a sentencepiece model or a tokenizer.json."""
import pytest

from ntl_deepspeed.train.data.corpus import generate
from ntl_deepspeed.train.data.encode import text_encoder
from ntl_deepspeed.train.data.tokenizer import train_tokenizer
from ntl_deepspeed.train.data.sources import pack


def test_corpus_is_seeded():
    assert generate(50, seed=3) == generate(50, seed=3) != generate(50, seed=4)


def test_sentencepiece_blocks_split_digits(tmp_path):
    path = train_tokenizer(vocab_size=400, seed=1, n_sentences=800, cache_dir=str(tmp_path))
    encode, eos = text_encoder(path)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=path)
    pieces = [sp.id_to_piece(i) for i in encode("Ada had 482 apples")]
    assert {"4", "8", "2"} <= set(pieces)  # split_digits
    blocks = pack((encode(s) for s in generate(200, 0)), eos, 33)  # the trainer's packing
    assert {len(b) for b in blocks[:-1]} == {33} and any(eos in b for b in blocks)


def test_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.train_from_iterator(generate(500, 0), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"]))
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    encode, eos = text_encoder(str(tmp_path))  # the directory works too
    assert eos == tok.token_to_id("<|endoftext|>")
    assert encode("12 + 3 = 15") == tok.encode("12 + 3 = 15").ids
    blocks = pack((encode(s) for s in generate(300, 0)), eos, 17)
    assert {len(b) for b in blocks[:-1]} == {17} and any(eos in b for b in blocks)


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        text_encoder(str(tmp_path / "missing.model"))
    (tmp_path / "x.tiktoken").write_text("")
    with pytest.raises(ValueError, match="tiktoken"):
        text_encoder(str(tmp_path / "x.tiktoken"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        text_encoder(str(tmp_path / "empty"))
