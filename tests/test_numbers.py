"""NumberVocab from every tokenizer form, its modes, padding, sharding and command line."""
import base64
import subprocess
import sys

import pytest
import torch

import ntloss
from ntl_deepspeed import NumberVocab
from ntl_deepspeed.numbers import partition_bounds

CORPUS = ["I paid 48 dollars for 3 books and 12 pens in 2024.",
          "The total is 1234 plus 56 equals 1290, not 7 or 99.",
          "Pi is about 3.14 and e about 2.71; 0 1 2 3 4 5 6 7 8 9."] * 50


@pytest.fixture(scope="module")
def byte_level_bpe_json():
    """A GPT-2-style byte-level BPE trained on the spot (multi-digit and 'Ġ48' tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok.to_str()


@pytest.fixture
def hf_tokenizer(byte_level_bpe_json):
    """A fresh HF tokenizer per test: ntloss adds tokens to the one it is given."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(byte_level_bpe_json))


def test_hf_object_digits_mode_equals_reference_and_does_not_mutate(hf_tokenizer):
    size = len(hf_tokenizer)
    vocab = NumberVocab.from_tokenizer(hf_tokenizer, mode="digits")
    assert len(hf_tokenizer) == size
    ref = ntloss.NTLoss(hf_tokenizer, reweigh=False)  # (ntloss would add missing digits)
    torch.testing.assert_close(vocab.values, ref.number_values, equal_nan=True)
    assert sorted(vocab.number_values.tolist()) == [float(d) for d in range(10)]


def test_floats_mode_equals_reference_multi_digit(hf_tokenizer):
    vocab = NumberVocab.from_tokenizer(hf_tokenizer, mode="floats")
    ref = ntloss.NTLoss(hf_tokenizer, digit_level=False, reweigh=False)
    torch.testing.assert_close(vocab.values, ref.number_values, equal_nan=True)


def test_integers_mode_reads_marked_tokens_the_reference_misses(hf_tokenizer):
    vocab = NumberVocab.from_tokenizer(hf_tokenizer, mode="integers")
    ids = hf_tokenizer.convert_tokens_to_ids(["\u012048", "\u01201234", "14", "02"])
    assert [vocab.values[i].item() for i in ids] == [48.0, 1234.0, 14.0, 2.0]
    ref = ntloss.NTLoss(hf_tokenizer, digit_level=False, reweigh=False)
    assert torch.isnan(ref.number_values[ids[0]])


def test_tokenizer_json_file_and_directory(hf_tokenizer, tmp_path):
    hf_tokenizer.save_pretrained(tmp_path)
    a = NumberVocab.from_tokenizer(tmp_path / "tokenizer.json", mode="integers")
    b = NumberVocab.from_tokenizer(str(tmp_path), mode="integers")
    c = NumberVocab.from_tokenizer(hf_tokenizer, mode="integers")
    torch.testing.assert_close(a.values, c.values, equal_nan=True)
    torch.testing.assert_close(b.values, c.values, equal_nan=True)


def test_sentencepiece_model(mistral_model_path):
    import sentencepiece as spm

    digits = NumberVocab.from_tokenizer(mistral_model_path)
    sp = spm.SentencePieceProcessor(model_file=mistral_model_path)
    assert digits.vocab_size == 32000
    pieces = [sp.id_to_piece(i) for i in digits.number_ids.tolist()]
    assert sorted(pieces) == [str(d) for d in range(10)] and pieces != sorted(pieces)  # unsorted ids
    same = NumberVocab.from_tokenizer(sp)
    assert torch.equal(same.number_ids, digits.number_ids)
    integers = NumberVocab.from_tokenizer(mistral_model_path, mode="integers")
    assert set(digits.number_ids.tolist()) <= set(integers.number_ids.tolist())


def test_tiktoken_file(tmp_path):
    pieces = [b"a", b"b", b"5", b"123", b" 48", b"\xe2\x96\x81", b"\xff", b"x1"]
    path = tmp_path / "tiny.tiktoken"
    path.write_text("".join(f"{base64.b64encode(p).decode()} {i}\n" for i, p in enumerate(pieces)))
    vocab = NumberVocab.from_tokenizer(path, mode="integers")
    assert vocab.number_ids.tolist() == [2, 3, 4]
    assert vocab.number_values.tolist() == [5.0, 123.0, 48.0]
    assert NumberVocab.from_tokenizer(path, mode="digits").number_ids.tolist() == [2]


def test_padded_vocab_and_errors():
    tokens = ["<pad>", "a", "1", "2", "."]
    padded = NumberVocab.from_tokens(tokens, vocab_size=8)
    assert padded.vocab_size == 8 and torch.isnan(padded.values[5:]).all()
    with pytest.raises(ValueError, match="smaller than the tokenizer's 5 ids"):
        NumberVocab.from_tokens(tokens, vocab_size=4)
    with pytest.raises(ValueError, match="no number token in mode 'digits'"):
        NumberVocab.from_tokens(["a", "b", "\u25815"])
    with pytest.raises(ValueError, match="unknown number-token mode"):
        NumberVocab.from_tokens(tokens, mode="roman")
    with pytest.raises(FileNotFoundError):
        NumberVocab.from_tokenizer("/nonexistent/tokenizer.model")


def test_slices_even_and_uneven():
    vocab = NumberVocab.from_tokens([str(i % 10) if i % 3 == 0 else f"t{i}" for i in range(10)])
    assert partition_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    slices = [vocab.slice_numbers(s, e) for s, e in partition_bounds(10, 3)]
    assert [ids.tolist() for ids, _ in slices] == [[0, 3], [2], [2]]  # relative to the start
    assert torch.cat([v for _, v in slices]).tolist() == [0.0, 3.0, 6.0, 9.0]
    ids, values = vocab.slice_numbers(5, 10)
    assert ids.tolist() == [1, 4] and values.tolist() == [6.0, 9.0]
    for start, end in [(5, 11), (-1, 4), (4, 4)]:
        with pytest.raises(ValueError, match="not inside"):
            vocab.slice_numbers(start, end)
    with pytest.raises(ValueError, match="cannot split a vocab of 10 over 11 ranks"):
        partition_bounds(10, 11)


def test_shard_for_one_rank():
    vocab = NumberVocab.from_tokens([str(i % 10) if i % 3 == 0 else f"t{i}" for i in range(10)],
                                    vocab_size=12)
    shard = vocab.shard_for(12)
    assert (shard.start, shard.end, shard.width, shard.group_size, shard.rank) == (0, 12, 12, 1, 0)
    assert shard.fits and not shard.parallel and shard.vocab_size == 12 and shard.group is None
    assert shard.number_ids.tolist() == [0, 3, 6, 9]
    assert shard.number_values.tolist() == [0.0, 3.0, 6.0, 9.0]
    assert shard.column_to_number.tolist() == [0, -1, -1, 1, -1, -1, 2, -1, -1, 3, -1, -1]
    torch.testing.assert_close(shard.values, vocab.values, equal_nan=True)
    assert vocab.shard_for(12, None, None, torch.device("cpu")) is shard  # cached per layout
    with pytest.raises(ValueError, match="logits have 10 vocab entries but the NumberVocab has "
                                         "12; build it with vocab_size=10"):
        vocab.shard_for(10)
    with pytest.raises(ValueError, match="vocab_start_index=2 was given without a "
                                         "tensor-parallel group"):
        vocab.shard_for(10, start=2)


def test_command_line(mistral_model_path):
    out = subprocess.run([sys.executable, "-m", "ntl_deepspeed.numbers", mistral_model_path,
                          "--text", "I have 12 apples."], capture_output=True, text=True,
                         check=True).stdout
    assert "number_tokens=10" in out
    assert "[1=1] [2=2]" in out and "2 would receive NTL" in out
