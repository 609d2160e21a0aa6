"""Bad input: a clear error or a defined value -- never NaN, never a silent wrong answer.

Value checks (label ids, loss weights) are device-side asserts by default (on CPU they raise a
RuntimeError at once) and host checks naming the bad value with ``check_inputs=True``. Config
errors are in test_config.py.
"""
import pytest
import torch
import torch.nn.functional as F

from ntl_deepspeed import NTLConfig, NumberVocab, ce_ntl, ntl_loss

TOKENS = ["<pad>", "a", "b", "."] + [str(d) for d in range(10)]
V, H = len(TOKENS), 6
CHECKED = NTLConfig(check_inputs=True)


@pytest.fixture
def vocab():
    return NumberVocab.from_tokens(TOKENS)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 5, V, generator=g), torch.tensor([[1, 5, 6, 2, 13],
                                                            [4, 4, -100, 3, 9]])


@pytest.fixture
def head():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 5, H, generator=g), torch.randn(V, H, generator=g)


@pytest.mark.parametrize("bad", [14, 99, -1, -5])
def test_label_outside_vocab(vocab, batch, head, bad):
    logits, labels = batch
    hidden, weight = head
    labels = labels.clone()
    labels[1, 1] = bad
    # default: a device-side assert (no host sync), which cannot name the id
    device_assert = r"a label id is outside the vocabulary \[0, 14\) and is not ignore_index=-100"
    with pytest.raises(RuntimeError, match=device_assert):
        ce_ntl(labels, vocab, logits=logits)
    with pytest.raises(RuntimeError, match=device_assert):
        ce_ntl(labels, vocab, hidden=hidden, head_weight=weight)
    # check_inputs: checked on the host, the id named
    named = rf"label id {bad} is outside the vocabulary \[0, 14\) and is not ignore_index=-100 " \
            r"\(1 such labels\)"
    with pytest.raises(ValueError, match=named):
        ce_ntl(labels, vocab, CHECKED, logits=logits)
    with pytest.raises(ValueError, match=named):
        ce_ntl(labels, vocab, CHECKED, hidden=hidden, head_weight=weight)
    with pytest.raises(ValueError, match=f"label id {bad} is outside the vocabulary"):
        ntl_loss(logits, labels, vocab)


def test_other_ignore_index(vocab, batch):
    """ignore_index=-1: -1 labels drop out (as in F.cross_entropy), -100 is now out of range."""
    logits, labels = batch
    labels = torch.where(labels == -100, -1, labels)
    out = ce_ntl(labels, vocab, NTLConfig(ignore_index=-1, enabled=False), logits=logits)
    ref = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-1)
    torch.testing.assert_close(out.ce, ref)
    with pytest.raises(ValueError, match="label id -100 is outside .* ignore_index=-1"):
        ce_ntl(labels.where(labels != -1, -100), vocab, NTLConfig(ignore_index=-1,
                                                                   check_inputs=True),
               logits=logits)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_bad_loss_weights(vocab, batch, bad):
    logits, labels = batch
    w = torch.ones(2, 5)
    w[0, 3] = bad
    with pytest.raises(RuntimeError, match="loss_weights must be finite and >= 0"):
        ce_ntl(labels, vocab, logits=logits, loss_weights=w)
    with pytest.raises(ValueError, match="loss_weights must be finite and >= 0"):
        ce_ntl(labels, vocab, CHECKED, logits=logits, loss_weights=w)


def test_shape_mismatch(vocab, batch, head):
    logits, labels = batch
    hidden, weight = head
    with pytest.raises(ValueError, match=r"logits \(2, 5, 14\) and labels \(2, 4\) do not match"):
        ce_ntl(labels[:, :4], vocab, logits=logits)
    with pytest.raises(ValueError, match=r"loss_weights \(2, 4\) must have the labels' shape"):
        ce_ntl(labels, vocab, logits=logits, loss_weights=torch.ones(2, 4))
    with pytest.raises(ValueError, match="build it with vocab_size=13"):
        ce_ntl(labels.clamp(max=12), vocab, logits=logits[..., :13])
    with pytest.raises(ValueError, match="the shard is 14 columns wide but the logits have 13"):
        ce_ntl(labels.clamp(max=12), vocab.shard_for(V), logits=logits[..., :13])
    with pytest.raises(ValueError, match="the shard is 14 columns wide but the head has 12"):
        ce_ntl(labels.clamp(max=11), vocab.shard_for(V), hidden=hidden, head_weight=weight[:12])
    with pytest.raises(ValueError, match=r"hidden \(2, 3, 6\) and labels \(2, 5\) do not match"):
        ce_ntl(labels, vocab, hidden=hidden[:, :3], head_weight=weight)
    with pytest.raises(ValueError, match=r"weight \(14, 3\) must be \[V_local, 6\]"):
        ce_ntl(labels, vocab, hidden=hidden, head_weight=weight[:, :3])
    with pytest.raises(ValueError, match=r"bias \(13,\) must be \[14\]"):
        ce_ntl(labels, vocab, hidden=hidden, head_weight=weight, head_bias=torch.zeros(13))


def test_front_door_takes_logits_or_hidden(vocab, batch, head):
    logits, labels = batch
    hidden, weight = head
    for kwargs in ({}, {"logits": logits, "hidden": hidden, "head_weight": weight},
                   {"hidden": hidden}, {"logits": logits, "head_weight": weight}):
        with pytest.raises(TypeError, match="ce_ntl takes logits=..., or hidden=... with "):
            ce_ntl(labels, vocab, **kwargs)


def test_start_index_without_tp_group(vocab):
    with pytest.raises(ValueError, match="vocab_start_index=3 was given without a "
                                         "tensor-parallel group .*pass the TP group too"):
        vocab.shard_for(V - 3, None, 3)
    with pytest.raises(ValueError, match="vocab_start_index=3 was given without"):
        vocab.shard_for(V, start=3)  # even when the width would fit
    whole = vocab.shard_for(V, None, 0)  # start 0 is the whole vocab: fine
    assert (whole.start, whole.end, whole.group_size, whole.fits) == (0, V, 1, True)


def test_no_number_label_gives_zero_ntl_with_zero_gradient(vocab, batch):
    logits, _ = batch
    labels = torch.tensor([[1, 2, 3, 0, 1], [2, 2, -100, 3, 1]])
    x = logits.clone().requires_grad_()
    out = ce_ntl(labels, vocab, NTLConfig(kind="mse"), logits=x)
    assert out.ntl.item() == 0.0 and out.ntl.requires_grad
    out.ntl.backward()
    assert torch.count_nonzero(x.grad) == 0


def test_every_token_ignored_gives_zero_not_nan(vocab, batch, head):
    logits, labels = batch
    hidden, weight = head
    ignored = torch.full_like(labels, -100)
    x = logits.clone().requires_grad_()
    out = ce_ntl(ignored, vocab, NTLConfig(reweigh=True), logits=x)
    assert out.loss.item() == 0.0 and out.ce.item() == 0.0 and out.ntl.item() == 0.0
    out.loss.backward()
    assert torch.count_nonzero(x.grad) == 0
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = ce_ntl(ignored, vocab, NTLConfig(kind="number_level"), hidden=h, head_weight=w)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0


def test_empty_batch(vocab):
    x = torch.zeros(0, V, requires_grad=True)
    out = ce_ntl(torch.zeros(0, dtype=torch.long), vocab, logits=x)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert x.grad.shape == (0, V)
    h, w = torch.zeros(1, 0, H, requires_grad=True), torch.ones(V, H, requires_grad=True)
    out = ce_ntl(torch.zeros(1, 0, dtype=torch.long), vocab, NTLConfig(kind="number_level"),
                 hidden=h, head_weight=w)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert h.grad.shape == (1, 0, H) and torch.count_nonzero(w.grad) == 0


def test_non_finite_inputs_with_check_finite(vocab, batch, head):
    logits, labels = batch
    logits = logits.clone()
    logits[0, 1, 3] = float("nan")
    logits[1, 0, 0] = float("inf")
    # check_finite off (the default, no host sync): NaN in, NaN out -- as F.cross_entropy
    ref = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1))
    assert torch.isnan(ref) and torch.isnan(ce_ntl(labels, vocab, logits=logits).loss)
    with pytest.raises(ValueError, match=r"logits contain 2 non-finite values"):
        ce_ntl(labels, vocab, NTLConfig(check_finite=True), logits=logits)
    hidden, weight = head
    hidden = hidden.clone()
    hidden[0, 2, 0] = float("nan")  # one token: all of its 14 logits
    with pytest.raises(ValueError, match=r"logits contain 14 non-finite values"):
        ce_ntl(labels, vocab, NTLConfig(check_finite=True, fused_block_size=4),
               hidden=hidden, head_weight=weight)


def test_large_logits_stay_finite(vocab, batch):
    """Number tokens far below the best logit: the number softmax must not underflow to 0/0."""
    logits, labels = batch
    logits = logits.clone()
    logits[..., :4] += 500.0  # text tokens dominate by e^500
    x = logits.requires_grad_()
    out = ce_ntl(labels, vocab, NTLConfig(kind="was", reweigh=True), logits=x)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all()
    ref = ntl_loss(logits.detach(), labels, vocab, "was", reweigh=True)
    torch.testing.assert_close(out.ntl, ref, rtol=1e-5, atol=1e-5)
    ref_ce = F.cross_entropy(logits.detach().reshape(-1, V), labels.reshape(-1))
    torch.testing.assert_close(out.ce, ref_ce, rtol=1e-5, atol=1e-5)


def test_bad_call_arguments(vocab, batch):
    logits, labels = batch
    with pytest.raises(ValueError, match="reduction='avg': expected one of"):
        ce_ntl(labels, vocab, logits=logits, reduction="avg")
    with pytest.raises(TypeError, match="labels must be int64"):
        ce_ntl(labels.float(), vocab, logits=logits)
    with pytest.raises(TypeError, match="logits must be a floating-point tensor"):
        ce_ntl(labels, vocab, logits=logits.long())
    out = ce_ntl(labels.int(), vocab, logits=logits, reduction="none")  # int32 ids are fine
    ref = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(out.ce_per_token.reshape(-1), ref)


def test_wrong_types_at_the_front_door(vocab, batch, head, tmp_path):
    """What users pass by mistake is named with the fix, at the call (or at apply), instead of an
    AttributeError deep inside (or at the first forward)."""
    import ntl_deepspeed.patches.transformers as hf_patch

    logits, labels = batch
    hidden, weight = head
    with pytest.raises(TypeError, match=r"shard must be a NumberVocab or VocabShard, got list: "
                                        r"build one with NumberVocab\.from_tokens"):
        ce_ntl(labels, TOKENS, logits=logits)
    path = str(tmp_path / "tokenizer.json")
    with pytest.raises(TypeError, match=r"got str: build one with NumberVocab\.from_tokenizer"):
        ce_ntl(labels, path, logits=logits)
    with pytest.raises(TypeError, match=r"vocab must be a NumberVocab, got list"):
        hf_patch.apply(TOKENS, NTLConfig())  # at apply, not at the first forward
    with pytest.raises(TypeError, match=r"vocab must be a NumberVocab, got VocabShard"):
        hf_patch.apply(vocab.shard_for(V), NTLConfig())
    assert not hf_patch.is_applied()
    import ntl_deepspeed
    from tiny_llama import model_and_batch

    with pytest.raises(TypeError, match=r"vocab must be a NumberVocab, got str: build one with "
                                        r"NumberVocab\.from_tokenizer"):
        ntl_deepspeed.install(model_and_batch()[0], vocab=path, config=NTLConfig())
    # gemm_dtype must be a floating-point dtype (int32 was accepted and changed the loss)
    for bad in (torch.int32, "bf16", torch.bool):
        with pytest.raises(TypeError, match=r"gemm_dtype=.*expected None or a floating-point "
                                            r"torch\.dtype"):
            ce_ntl(labels, vocab, hidden=hidden, head_weight=weight, gemm_dtype=bad)
    # number_level assembles digits: an integers-mode vocab ('12' is one token) is refused
    ints = NumberVocab.from_tokens(TOKENS[:4] + ["12", "7", "345"] + TOKENS[7:], mode="integers")
    number_level = NTLConfig(kind="number_level")
    with pytest.raises(ValueError, match=r"kind='number_level' .* needs a NumberVocab in mode "
                                         r"'digits', got mode 'integers'"):
        ce_ntl(labels, ints, number_level, logits=logits)
    with pytest.raises(ValueError, match="needs a NumberVocab in mode 'digits'"):
        hf_patch.apply(ints, number_level)
    ce_ntl(labels, ints, NTLConfig(kind="was"), logits=logits)  # other kinds: fine
    with pytest.raises(TypeError, match="config must be an NTLConfig, got dict"):
        ce_ntl(labels, vocab, {"weight": 0.3}, logits=logits)


def test_autotp_size_larger_than_the_world_is_refused(monkeypatch):
    """initialize with AutoTP 2 on one process ended in a bare AssertionError inside DeepSpeed."""
    import ntl_deepspeed
    from tiny_llama import TOKENS as LLAMA_TOKENS, model_and_batch

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model = model_and_batch()[0]
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0},
              "tensor_parallel": {"autotp_size": 2}, "ntl": {"weight": 0.3}}
    with pytest.raises(ValueError, match=r"tensor_parallel\.autotp_size=2 needs a multiple of 2 "
                                         r"processes, but this run has 1: launch it with e\.g\. "
                                         r"`deepspeed --num_gpus 2"):
        ntl_deepspeed.initialize(model, config, vocab=NumberVocab.from_tokens(LLAMA_TOKENS))
