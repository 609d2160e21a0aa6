"""The single-device reference and the op (``ce_ntl``) against the installed ntloss package (and
its stored values)."""
import pytest
import torch
import torch.nn.functional as F

import ntloss
from ntl_deepspeed import NTLConfig, NumberVocab, ce_ntl, ntl_loss, number_level_loss

KINDS = {"was": None, "mse": F.mse_loss, "l1": F.l1_loss, "huber": F.huber_loss}


def _ours(name, logits, labels, vocab, weights):
    """Map a stored result name onto our call."""
    rw = "reweigh=True" in name
    red = next((r for r in ("sum", "none") if f"reduction={r}" in name or name.endswith(f" {r}")),
               "mean")
    w = weights if "loss_weights=w" in name else None
    if name.startswith("NumberLevelLoss"):
        return number_level_loss(logits, labels, vocab, float_level="float_level=True" in name,
                                 reweigh=rw, reduction=red)
    kind = "was" if name.startswith("NTLoss(WAS)") else name.split("(")[1].split(")")[0].lower()
    sq = 3.0 if "squash_factor=3" in name else None
    return ntl_loss(logits, labels, vocab, kind=kind, reweigh=rw, squash_factor=sq,
                    loss_weights=w, reduction=red)


def test_small_case_all_stored_values(small_case):
    vocab = NumberVocab.from_tokens(small_case["vocab"])
    logits = torch.tensor(small_case["logits"])
    labels = torch.tensor(small_case["labels"])
    weights = torch.tensor(small_case["loss_weights"])
    checked = 0
    for name, expected in small_case["results"].items():
        if name.startswith("cross_entropy"):
            got = F.cross_entropy(logits.reshape(-1, 16), labels.reshape(-1))
        elif name.startswith("W1 via CDF"):
            got = ntl_loss(logits, labels, vocab, "was")
        else:
            got = _ours(name, logits, labels, vocab, weights)
        torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-5, atol=1e-5, msg=name)
        checked += 1
    assert checked == len(small_case["results"]) == 28  # 27 ntloss values + CE


class SentencePieceAsHF:
    """The interface ntloss reads from a tokenizer, over a real sentencepiece model."""

    def __init__(self, path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())}

    def __len__(self):
        return len(self.vocab)

    def get_vocab(self):
        return dict(self.vocab)

    def add_tokens(self, tokens):
        missing = [t for t in tokens if t not in self.vocab]
        assert not missing, f"tokenizer lacks {missing}"
        return 0

    def convert_tokens_to_ids(self, token):
        return self.vocab[token]


@pytest.fixture(scope="module")
def mistral(mistral_model_path):
    tok = SentencePieceAsHF(mistral_model_path)
    vocab = NumberVocab.from_tokenizer(mistral_model_path, mode="digits")
    g = torch.Generator().manual_seed(0)
    V = len(tok)
    logits = torch.randn(2, 24, V, generator=g) * 3
    digits = vocab.number_ids
    labels = torch.randint(0, V, (2, 24), generator=g)
    pick = torch.rand(2, 24, generator=g) < 0.5  # many number labels, some in runs
    labels[pick] = digits[torch.randint(0, 10, (int(pick.sum()),), generator=g)]
    labels[0, 5] = labels[1, 0] = -100
    labels[1, 10] = tok.convert_tokens_to_ids(".")
    labels[1, 9] = labels[1, 11] = digits[3]
    weights = torch.rand(2, 24, generator=g) * 2
    return tok, vocab, logits, labels, weights


def test_mistral_number_tokens_are_the_reference_digits(mistral):
    tok, vocab, *_ = mistral
    ref = ntloss.NTLoss(tok, reweigh=False)
    assert torch.equal(vocab.number_ids, ref.number_token_ids)
    torch.testing.assert_close(vocab.values, ref.number_values, equal_nan=True)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("reweigh", [False, True])
def test_mistral_token_level_all_reductions(mistral, kind, reweigh):
    tok, vocab, logits, labels, weights = mistral
    squashes = [None, 4.0] if kind == "was" else [None]
    for squash in squashes:
        if kind == "was":
            ref = ntloss.NTLoss(tok, reweigh=reweigh, squash_factor=squash)
        else:
            ref = ntloss.NTLossDotProduct(tok, reweigh=reweigh, loss_function=KINDS[kind])
        for red in ("mean", "sum", "none"):
            for w in (None, weights):
                a = logits.clone().requires_grad_()
                b = logits.clone().requires_grad_()
                ours = ntl_loss(a, labels, vocab, kind, reweigh=reweigh, squash_factor=squash,
                                loss_weights=w, reduction=red)
                theirs = ref(b, labels, loss_weights=w, reduction=red)
                torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
                ours.sum().backward()
                theirs.sum().backward()
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("float_level", [False, True])
@pytest.mark.parametrize("reweigh", [False, True])
def test_mistral_number_level(mistral, float_level, reweigh):
    tok, vocab, logits, labels, weights = mistral
    ref = ntloss.NumberLevelLoss(tok, float_level=float_level, reweigh=reweigh)
    for red in ("mean", "sum", "none"):
        for w in (None, weights):
            ours = number_level_loss(logits, labels, vocab, float_level=float_level,
                                     reweigh=reweigh, loss_weights=w, reduction=red)
            theirs = ref(logits, labels, loss_weights=w, reduction=red)
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def ntloss_for(tok, cfg):
    if cfg.kind == "was":
        return ntloss.NTLoss(tok, reweigh=cfg.reweigh, squash_factor=cfg.squash_factor)
    if cfg.kind == "number_level":
        return ntloss.NumberLevelLoss(tok, float_level=cfg.float_level, reweigh=cfg.reweigh)
    return ntloss.NTLossDotProduct(tok, reweigh=cfg.reweigh, loss_function=KINDS[cfg.kind])


@pytest.mark.parametrize("cfg", [
    NTLConfig(kind="was"), NTLConfig(kind="was", reweigh=True, squash_factor=4.0),
    NTLConfig(kind="mse", reweigh=True), NTLConfig(kind="l1"), NTLConfig(kind="huber"),
    NTLConfig(kind="number_level", reweigh=True), NTLConfig(kind="number_level",
                                                            float_level=True)],
    ids=lambda c: f"{c.kind}-reweigh={c.reweigh}-squash={c.squash_factor}-float={c.float_level}")
def test_op_matches_ntloss_and_cross_entropy(mistral, cfg):
    """The op on the full 32000-token logits: its NTL is ntloss', its CE F.cross_entropy's
    (weighted like the NTL), values and gradients."""
    tok, vocab, logits, labels, weights = mistral
    ref = ntloss_for(tok, cfg)
    shard = vocab.shard_for(logits.shape[-1])
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                         reduction="none").view(labels.shape)
    for w in (None, weights):
        a = logits.clone().requires_grad_()
        b = logits.clone().requires_grad_()
        out = ce_ntl(labels, shard, cfg, logits=a, loss_weights=w)
        theirs = ref(b, labels, loss_weights=w)
        torch.testing.assert_close(out.ntl, theirs, rtol=1e-5, atol=1e-5)
        out.ntl.backward()
        theirs.backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
        ww = (labels != -100).float() * (1 if w is None else w)
        torch.testing.assert_close(out.ce, (ce * ww).sum() / ww.sum(), rtol=1e-5, atol=1e-5)
        per_token = ce_ntl(labels, shard, cfg, logits=logits, loss_weights=w, reduction="none")
        torch.testing.assert_close(per_token.ntl, ref(logits, labels, loss_weights=w,
                                                      reduction="none"), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(per_token.ce, ce * ww, rtol=1e-5, atol=1e-5)


def test_no_number_label_gives_zero_that_backpropagates(mistral):
    tok, vocab, logits, labels, _ = mistral
    text_only = torch.where(torch.isnan(vocab.values[labels.clamp_min(0)]), labels, 1)
    a = logits.clone().requires_grad_()
    loss = ntl_loss(a, text_only, vocab, "was")
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert torch.count_nonzero(a.grad) == 0
    assert ntloss.NTLoss(tok, reweigh=False)(logits, text_only).item() == 0
