"""Bad input: a clear error or a defined value -- never NaN, never a silent wrong answer."""
import pytest
import torch

from ntl_deepspeed import NTLConfig, NumberVocab, ntl_loss, vocab_parallel_ce_ntl

TOKENS = ["<pad>", "a", "b", "."] + [str(d) for d in range(10)]


@pytest.fixture
def vocab():
    return NumberVocab.from_tokens(TOKENS)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 5, len(TOKENS), generator=g), torch.tensor([[1, 5, 6, 2, 13],
                                                                      [4, 4, -100, 3, 9]])


@pytest.mark.parametrize("bad", [14, 99, -1, -5])
def test_label_outside_vocab_names_the_id(vocab, batch, bad):
    logits, labels = batch
    labels = labels.clone()
    labels[1, 1] = bad
    with pytest.raises(ValueError, match=f"label id {bad} is outside the vocabulary"):
        vocab_parallel_ce_ntl(logits, labels, vocab)
    with pytest.raises(ValueError, match=f"label id {bad} is outside the vocabulary"):
        ntl_loss(logits, labels, vocab)


def test_shape_mismatch(vocab, batch):
    logits, labels = batch
    with pytest.raises(ValueError, match=r"logits \(2, 5, 14\) and labels \(2, 4\) do not match"):
        vocab_parallel_ce_ntl(logits, labels[:, :4], vocab)
    with pytest.raises(ValueError, match="loss_weights"):
        vocab_parallel_ce_ntl(logits, labels, vocab, loss_weights=torch.ones(2, 4))
    with pytest.raises(ValueError, match="build it with vocab_size=13"):
        vocab_parallel_ce_ntl(logits[..., :13], labels.clamp(max=12), vocab)


def test_no_number_label_gives_zero_ntl_with_zero_gradient(vocab, batch):
    logits, _ = batch
    labels = torch.tensor([[1, 2, 3, 0, 1], [2, 2, -100, 3, 1]])
    x = logits.clone().requires_grad_()
    out = vocab_parallel_ce_ntl(x, labels, vocab, kind="mse")
    assert out.ntl.item() == 0.0 and out.ntl.requires_grad
    out.ntl.backward()
    assert torch.count_nonzero(x.grad) == 0


def test_every_token_ignored_gives_zero_not_nan(vocab, batch):
    logits, labels = batch
    x = logits.clone().requires_grad_()
    out = vocab_parallel_ce_ntl(x, torch.full_like(labels, -100), vocab, reweigh=True)
    assert out.loss.item() == 0.0 and out.ce.item() == 0.0 and out.ntl.item() == 0.0
    out.loss.backward()
    assert torch.count_nonzero(x.grad) == 0


def test_empty_batch(vocab):
    out = vocab_parallel_ce_ntl(torch.zeros(0, len(TOKENS)), torch.zeros(0, dtype=torch.long),
                                vocab)
    assert out.loss.item() == 0.0


def test_non_finite_logits_with_check_finite(vocab, batch):
    logits, labels = batch
    logits = logits.clone()
    logits[0, 1, 3] = float("nan")
    logits[1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"2 non-finite values"):
        vocab_parallel_ce_ntl(logits, labels, vocab, check_finite=True)


def test_large_logits_stay_finite(vocab, batch):
    """Number tokens far below the best logit: the number softmax must not underflow to 0/0."""
    logits, labels = batch
    logits = logits.clone()
    logits[..., :4] += 500.0  # text tokens dominate by e^500
    x = logits.requires_grad_()
    out = vocab_parallel_ce_ntl(x, labels, vocab, kind="was", reweigh=True)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all()
    ref = ntl_loss(logits.detach(), labels, vocab, "was", reweigh=True)
    torch.testing.assert_close(out.ntl, ref, rtol=1e-5, atol=1e-5)


def test_bad_options(vocab, batch):
    logits, labels = batch
    with pytest.raises(ValueError, match="kind='banana'"):
        NTLConfig(kind="banana")
    with pytest.raises(ValueError, match="squash_factor=1.0: must be > 1"):
        NTLConfig(squash_factor=1.0)
    with pytest.raises(ValueError, match="normalization='batch'"):
        NTLConfig(normalization="batch")
    with pytest.raises(ValueError, match="reduction='avg'"):
        vocab_parallel_ce_ntl(logits, labels, vocab, reduction="avg")
    with pytest.raises(ValueError, match="unknown NTL option"):
        NTLConfig.from_dict({"kind": "was", "lambda": 0.3})
    with pytest.raises(TypeError, match="int64"):
        vocab_parallel_ce_ntl(logits, labels.float(), vocab)
    with pytest.raises(ValueError, match="loss_weights must be finite and >= 0"):
        vocab_parallel_ce_ntl(logits, labels, vocab, loss_weights=-torch.ones(2, 5))
