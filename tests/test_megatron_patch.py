"""The Megatron-core patch on a real TP=2 GPTModel (megatron-core 0.16 to 0.19, CPU, gloo):
sequence parallelism, shared weights, MTP at TP=1, stacking, flags. HybridModel, MTP at TP=2, MuP
and the output_processor hook: tests/test_megatron_models.py."""
import functools

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed
from ntl_deepspeed import NTLConfig, NumberVocab, ntl_loss

from megatron_models import (TOKENS, VOCAB, batch, cpu_shims, grads, recorded_ce_ntl,
                             torch_norm_with_sequence_parallel)
from megatron_models import build_gpt as build_model


def assert_grads(model, ref_grads):
    got = grads(model)
    assert got.keys() == ref_grads.keys()
    for name, g in ref_grads.items():  # every parameter: the TP hidden-grad reduction
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)


def megatron_methods():
    """The class attributes the patch replaces (Megatron's own function objects when called
    before any patch)."""
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.models.gpt.gpt_model import GPTModel

    return (LanguageModule.__dict__["compute_language_model_loss"],
            GPTModel.__dict__["_postprocess"])


CASES = [("was", False, False), ("mse", True, False), ("was", False, True)]  # kind, share, SP


def worker(rank, world, cases):
    """Every (kind, shared weights, sequence parallel) case in one launch; the SP cases last
    (their norm shim stays installed)."""
    for kind, share, sp in sorted(cases, key=lambda c: c[2]):
        check_gpt_case(world, kind, share, sp)


def check_gpt_case(world, kind, share, sp):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    import ntl_deepspeed.patches.megatron_core as patch

    cpu_shims()
    if sp:
        torch_norm_with_sequence_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    originals = megatron_methods()
    try:
        vocab = NumberVocab.from_tokens(TOKENS)
        ids, pos, causal, labels = batch()

        # reference: unpatched model -> gathered full logits -> F.cross_entropy + 0.3 * ntl_loss
        model = build_model(share=share, sequence_parallel=sp)
        local = model(ids, pos, causal)  # [b, s, V/tp]
        full = gather_from_tensor_model_parallel_region(local)
        ce = F.cross_entropy(full.reshape(-1, VOCAB), labels.reshape(-1), reduction="none")
        ref = ce.view(labels.shape) + 0.3 * ntl_loss(full, labels, vocab, kind, reduction="none")
        ref.sum().backward()
        ref_grads = grads(model)

        for fused in (False, True):  # materialised logits, then the fused output layer
            cfg = NTLConfig(kind=kind, weight=0.3, fused_head=fused, fused_block_size=5,
                            fused_token_chunk=7)
            patch.apply(vocab, cfg)
            patch.apply(vocab, cfg)  # only updates the settings
            assert patch.is_applied() and patch.current_settings().config == cfg
            assert tuple(m.__wrapped__ for m in megatron_methods()) == originals  # not stacked
            model = build_model(share=share, sequence_parallel=sp)
            with recorded_ce_ntl() as calls:
                loss = model(ids, pos, causal, labels=labels)  # [b, s] per-token loss
            assert calls == ["hidden" if fused else "logits"], calls
            torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-5)
            loss.sum().backward()
            assert_grads(model, ref_grads)
            entry = patch.report_entry(torch.ones_like(labels, dtype=torch.float32))
            number_labels = (labels >= 4) & (labels < 14)
            assert entry[1].item() == number_labels.sum().item()
            logits = model(ids, pos, causal)  # no labels: the output layer gives logits
            assert logits.shape == (*labels.shape, VOCAB // world)
            assert "forward" not in vars(model.output_layer)  # the per-call override is gone

        patch.remove()
        assert not patch.is_applied() and patch.current_settings() is None
        assert megatron_methods() == originals  # Megatron's own function objects again
        model = build_model(share=share, sequence_parallel=sp)
        plain = model(ids, pos, causal, labels=labels)
        torch.testing.assert_close(plain, ce.view(labels.shape).detach(), rtol=1e-5, atol=1e-5)
    finally:
        patch.remove()
        parallel_state.destroy_model_parallel()


def test_patched_gpt_model_tp2_equals_reference():
    """One launch for all CASES (process start and Megatron's import dominate the time)."""
    run_distributed(worker, 2, CASES, timeout=400)


def mtp_reference(vocab, ids, pos, causal, labels):
    """An unpatched model with one MTP layer: (Megatron's main-head CE, the reference main loss
    CE + 0.3 * NTL, every parameter gradient of that loss sum, the MTP head's logits)."""
    model = build_model(mtp_layers=1)
    outputs = []  # MTP calls the output layer first, the main head last. Megatron's CE gets a

    def keep(module, inputs, output):  # copy (it overwrites fp32 logits in place)
        outputs.append(output[0])
        return output[0].clone(), output[1]

    model.output_layer.register_forward_hook(keep)
    plain_ce = model(ids, pos, causal, labels=labels)  # Megatron's own CE
    main_logits = outputs[-1].transpose(0, 1)            # [b, s, V]
    torch.testing.assert_close(plain_ce, F.cross_entropy(
        main_logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none").view(
            labels.shape), rtol=1e-5, atol=1e-5)
    ref = plain_ce + 0.3 * ntl_loss(main_logits, labels, vocab, "was", reduction="none")
    ref.sum().backward()  # includes the MTP loss gradient (MTPLossAutoScaler)
    return plain_ce.detach(), ref.detach(), grads(model), outputs[0].detach().transpose(0, 1)


def worker_mtp(rank, world):
    """With Multi-Token Prediction the main head must still get CE + NTL (MTP heads: CE, or
    CE + NTL with include_mtp), with and without the fused head, gradients included."""
    from megatron.core import parallel_state
    from megatron.core.transformer import multi_token_prediction as mtp_module
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    import ntl_deepspeed.patches.megatron_core as patch

    cpu_shims()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    try:
        vocab = NumberVocab.from_tokens(TOKENS)
        ids, pos, causal, labels = batch()
        _, ref, ref_grads, mtp_logits = mtp_reference(vocab, ids, pos, causal, labels)
        # the MTP head's loss as Megatron logs it: labels and mask rolled by one, last masked
        mtp_labels = torch.roll(labels, -1, -1)
        mtp_labels[:, -1] = 0
        mtp_mask = torch.ones_like(labels, dtype=torch.float32)
        mtp_mask[:, -1] = 0
        mtp_ce = F.cross_entropy(mtp_logits.reshape(-1, VOCAB), mtp_labels.reshape(-1),
                                 reduction="none").view(labels.shape)
        mtp_ntl = ntl_loss(mtp_logits, mtp_labels, vocab, "was", reduction="none")
        tracker = MTPLossLoggingHelper.tracker
        key = "loss_values" if "loss_values" in tracker else "values"  # renamed in 0.19
        # 0.17+: MTP heads run inside process_mtp_loss and keep real logits under the fused head
        mtp_logits_shape = (12, 2, VOCAB) if hasattr(mtp_module, "process_mtp_loss") else (0,)
        for include_mtp in (False, True):
            mtp_ref = ((mtp_ce + 0.3 * mtp_ntl * include_mtp) * mtp_mask).sum() / mtp_mask.sum()
            for fused in (False, True):  # fused: the main head only, MTP heads get logits
                patch.apply(vocab, NTLConfig(kind="was", weight=0.3, fused_head=fused),
                            include_mtp=include_mtp)
                model = build_model(mtp_layers=1)
                outputs = []
                model.output_layer.register_forward_hook(
                    lambda m, i, o: outputs.append(o[0].shape))
                tracker[key].zero_()
                with recorded_ce_ntl() as calls:
                    loss = model(ids, pos, causal, labels=labels)
                main = ["hidden" if fused else "logits"]
                assert calls == (["logits"] if include_mtp else []) + main, calls
                torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(tracker[key][0], mtp_ref, rtol=1e-5, atol=1e-6)
                # fused: the main head's output-layer call returns an empty stand-in (no logits)
                assert outputs == ([mtp_logits_shape, (0,)] if fused else [(12, 2, VOCAB)] * 2), \
                    outputs
                if not include_mtp:  # the reference's MTP loss is CE: gradients match
                    loss.sum().backward()
                    assert_grads(model, ref_grads)
    finally:
        patch.remove()
        parallel_state.destroy_model_parallel()


def test_main_head_gets_ntl_with_multi_token_prediction():
    run_distributed(worker_mtp, 1, timeout=300)


class OtherPlugin:
    """What other plugins do: ``functools.wraps`` wrappers on the same methods, the original
    saved, put back on removal."""

    def __init__(self, log):
        self.log, self.saved = log, {}

    def install(self):
        for owner, name in _patched_slots():
            original = getattr(owner, name)

            @functools.wraps(original)
            def theirs(*args, _original=original, _name=name, **kwargs):
                self.log.append(_name)
                return _original(*args, **kwargs)

            self.saved[name] = (owner, original)
            setattr(owner, name, theirs)

    def remove(self):
        for name, (owner, original) in self.saved.items():
            setattr(owner, name, original)


def _patched_slots():
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.models.gpt.gpt_model import GPTModel

    return [(LanguageModule, "compute_language_model_loss"), (GPTModel, "_postprocess")]


def worker_stacking(rank, world):
    """Our patch and another plugin's wrappers on the same two methods, in both orders."""
    from megatron.core import parallel_state

    import ntl_deepspeed.patches.megatron_core as patch

    cpu_shims()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    originals = megatron_methods()
    try:
        vocab = NumberVocab.from_tokens(TOKENS)
        ids, pos, causal, labels = batch()
        plain_ce, ref, _, _ = mtp_reference(vocab, ids, pos, causal, labels)
        model = build_model(mtp_layers=1)  # MTP: the main head must be found through them
        log = []

        def check(expected):
            for fused in (False, True):
                if patch.current_settings() is not None:
                    patch.apply(vocab, NTLConfig(weight=0.3, fused_head=fused))
                log.clear()
                loss = model(ids, pos, causal, labels=labels)
                torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
                assert sorted(set(log)) == ["_postprocess", "compute_language_model_loss"], log

        for ours_first in (True, False):
            for ours_removed_first in (True, False):
                theirs = OtherPlugin(log)
                if ours_first:
                    patch.apply(vocab, NTLConfig(weight=0.3))
                    theirs.install()
                else:
                    theirs.install()
                    patch.apply(vocab, NTLConfig(weight=0.3))
                assert patch.is_applied()
                check(ref)
                patch.apply(vocab, NTLConfig(weight=0.3))  # idempotent under theirs too
                check(ref)
                if ours_removed_first:
                    patch.remove()
                    assert not patch.is_applied()
                    check(plain_ce)  # theirs still runs, ours passes through
                    if ours_first:  # ours still sits under theirs: apply re-activates it
                        patch.apply(vocab, NTLConfig(weight=0.3))
                        check(ref)
                        patch.remove()
                    theirs.remove()
                    if ours_first:  # theirs put back what it saved: our (idle) wrapper, whose
                        log.clear()  # calls are Megatron's, until remove() takes it out
                        torch.testing.assert_close(model(ids, pos, causal, labels=labels),
                                                   plain_ce, rtol=1e-5, atol=1e-5)
                        assert log == []
                        patch.remove()
                else:
                    theirs.remove()  # puts back what it saved
                    if not ours_first:  # Megatron's: ours, above theirs, went with it
                        assert not patch.is_applied()
                    else:  # ours, on top again
                        assert patch.is_applied()
                        log.clear()
                        torch.testing.assert_close(model(ids, pos, causal, labels=labels),
                                                   ref, rtol=1e-5, atol=1e-5)
                    patch.remove()
                assert megatron_methods() == originals, (ours_first, ours_removed_first)
                torch.testing.assert_close(model(ids, pos, causal, labels=labels), plain_ce,
                                           rtol=1e-5, atol=1e-5)
    finally:
        patch.remove()
        parallel_state.destroy_model_parallel()


def test_stacks_with_other_wrappers_in_either_order():
    run_distributed(worker_stacking, 1, timeout=300)


def test_missing_symbol_is_named(monkeypatch):
    """A missing symbol or a changed signature: an error naming it and the installed version;
    nothing is patched."""
    import megatron_models as mm

    import ntl_deepspeed.patches.megatron_core as patch
    from megatron.core.models.common.language_module import language_module
    from megatron.core.models.gpt import gpt_model
    from megatron.core.transformer import multi_token_prediction

    installed = f"installed: megatron-core {mm.version()}"
    originals = megatron_methods()
    with monkeypatch.context() as m:
        m.delattr(language_module.LanguageModule, "compute_language_model_loss")
        with pytest.raises(AttributeError, match=r"LanguageModule\.compute_language_model_loss"
                           rf".*{installed}"):
            patch.apply(NumberVocab.from_tokens(TOKENS))
    with monkeypatch.context() as m:
        m.delattr(gpt_model.GPTModel, "_postprocess")
        with pytest.raises(AttributeError, match=r"gpt_model\.GPTModel\._postprocess"):
            patch.apply(NumberVocab.from_tokens(TOKENS))
    with monkeypatch.context() as m:  # a future signature without 'labels'
        m.setattr(gpt_model.GPTModel, "_postprocess", lambda self, hidden_states, **kw: None)
        with pytest.raises(TypeError,
                           match=rf"_postprocess has no parameter 'labels'.*{installed}"):
            patch.apply(NumberVocab.from_tokens(TOKENS))
    with monkeypatch.context() as m:
        m.setattr(language_module.LanguageModule, "compute_language_model_loss",
                  lambda self, logits, labels: None)
        with pytest.raises(TypeError, match=r"takes \['self', 'logits', 'labels'\]"):
            patch.apply(NumberVocab.from_tokens(TOKENS))
    if mm.has_hybrid():
        from megatron.core.models.hybrid import hybrid_model

        with monkeypatch.context() as m:
            m.setattr(hybrid_model.HybridModel, "forward", lambda self, input_ids, **kw: None)
            with pytest.raises(TypeError, match=r"HybridModel\.forward has no parameter 'labels'"):
                patch.apply(NumberVocab.from_tokens(TOKENS))
    if hasattr(multi_token_prediction, "process_mtp_loss"):  # 0.17+
        with monkeypatch.context() as m:  # the model module stopped calling it by that name
            m.delattr(gpt_model, "process_mtp_loss")
            with pytest.raises(AttributeError, match=r"gpt_model\.process_mtp_loss"):
                patch.apply(NumberVocab.from_tokens(TOKENS))
    assert megatron_methods() == originals and not patch.is_applied()


def test_fused_head_is_a_config_field_and_normalization_is_megatrons():
    import ntl_deepspeed.patches.megatron_core as patch

    try:
        with pytest.raises(TypeError, match="fused_head"):  # the 0.2 keyword, removed in 0.3
            patch.apply(NumberVocab.from_tokens(TOKENS), NTLConfig(kind="mse"), fused_head=True)
        patch.apply(NumberVocab.from_tokens(TOKENS), NTLConfig(
            kind="mse", fused_head=True, fused_block_size=5, fused_token_chunk=7))
        assert patch.current_settings().config == NTLConfig(
            kind="mse", fused_head=True, fused_block_size=5, fused_token_chunk=7)
        with pytest.warns(UserWarning, match="normalization"):  # Megatron normalises itself
            patch.apply(NumberVocab.from_tokens(TOKENS), NTLConfig(normalization="global"))
    finally:
        patch.remove()


def test_megatron_lm_arguments_cover_ntl_config(mistral_model_path):
    import argparse
    from dataclasses import fields

    import ntl_deepspeed.patches.megatron_core as patch

    parser = patch.add_ntl_args(argparse.ArgumentParser())
    dests = {a.dest for a in parser._actions}
    for f in fields(NTLConfig):  # every field that applies, and only those
        assert (f"ntl_{f.name}" in dests) == (f.name not in patch.EXCLUDED_OPTIONS), f.name
    assert set(patch.EXCLUDED_OPTIONS) == {"log_metrics", "normalization"}
    args = parser.parse_args([
        "--ntl-tokenizer", mistral_model_path, "--ntl-kind", "number_level", "--ntl-float-level",
        "--ntl-weight", "0.5", "--ntl-reweigh", "--ntl-check-inputs", "--ntl-check-finite",
        "--ntl-ignore-index", "-1", "--ntl-backend", "torch", "--ntl-fused-head",
        "--ntl-fused-block-size", "256", "--ntl-fused-token-chunk", "512", "--ntl-include-mtp"])
    args.padded_vocab_size = 32768
    try:
        vocab = patch.apply_from_args(args)
        assert (vocab.vocab_size, vocab.number_ids.numel()) == (32768, 10)
        settings = patch.current_settings()
        assert settings.config == NTLConfig(
            kind="number_level", float_level=True, weight=0.5, reweigh=True, check_inputs=True,
            check_finite=True, ignore_index=-1, backend="torch", fused_head=True,
            fused_block_size=256, fused_token_chunk=512)
        assert settings.include_mtp and settings.vocab is vocab and patch.is_applied()

        # a second apply updates the settings; the flags not given keep NTLConfig's defaults
        for flags, enabled in ((["--ntl-disable"], False), (["--no-ntl-enabled"], False),
                               (["--ntl-enabled"], True), ([], True)):
            args = parser.parse_args(["--ntl-tokenizer", mistral_model_path, "--ntl-mode",
                                      "integers", "--ntl-squash-factor", "3", *flags])
            patch.apply_from_args(args)
            assert patch.current_settings().config == NTLConfig(
                mode="integers", squash_factor=3.0, enabled=enabled), flags
            assert not patch.current_settings().include_mtp and patch.is_applied()
    finally:
        patch.remove()
