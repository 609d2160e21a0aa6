"""The Megatron patch (and the output_processor hook) on megatron-core's models as users run them:
HybridModel and GPTModel, with multi-token prediction (MTP) and MuP, fused head and not, training
and eval -- TP=2, real gloo processes, one launch for all cases.

Reference for every case: the *unpatched* model with the same weights; its output-layer results
(MuP-scaled by the config's multiplier) gathered over TP; ``F.cross_entropy`` + 0.3 *
``ntl_loss`` (the single-device oracle) on them for the main head, ``F.cross_entropy`` (+ 0.3 *
NTL with include_mtp) on each MTP head's with Megatron's rolled labels/mask; every parameter's
gradient of that total (the MTP part enters as Megatron's MTPLossAutoScaler injects it). The
errors are printed (``pytest -s``) as ``ERR <case> loss=... grad=... mtp=...`` (loss and logged
MTP loss: absolute 2e-5; gradients: rtol 1e-4, atol 1e-5 per element).

On megatron-core 0.16 only the GPTModel cases run (no HybridModel, MuP or output_processor); on
0.17 MambaModel (HybridModel's predecessor, same inline post-processing) stands in for HybridModel.
"""

import pytest
import torch
import torch.nn.functional as F

import megatron_models as mm
from dist_utils import run_distributed
from ntl_deepspeed import NTLConfig, NumberVocab, ntl_loss

TOL = 2e-5
WEIGHT = 0.3


def count_head_gemms(model):
    """A list that receives one entry per GEMM of the output layer over its vocab shard: the
    layer's own forward implementation, wrapped on this instance."""
    layer, calls = model.output_layer, []
    impl = layer._forward_impl

    def counting(input, weight, *a, **k):
        calls.append(tuple(weight.shape))
        return impl(input, weight, *a, **k)

    layer._forward_impl = counting
    return calls


def rolled(t):
    """Megatron's roll_tensor without CP: shift left by one, last position 0."""
    out = torch.roll(t, -1, -1)
    out[..., -1] = 0
    return out


class Case:
    def __init__(self, name, build, mtp_layers=None, mup=False, sequence_parallel=False):
        self.name, self.build, self.mtp_layers, self.mup = name, build, mtp_layers, mup
        self.sequence_parallel = sequence_parallel

    def model(self):
        return self.build(mtp_layers=self.mtp_layers, mup=self.mup,
                          sequence_parallel=self.sequence_parallel)


def reference(case, vocab, data, include_mtp):
    """(main per-token loss [b, s], MTP logged losses, every parameter gradient) of the
    unpatched model, see the module docstring."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    import ntl_deepspeed.patches.megatron_core as patch

    patch.remove()  # Megatron's own model
    ids, pos, causal, labels = data
    model = case.model()
    outputs = []

    def keep(module, inputs, output):  # Megatron's CE overwrites fp32 logits: give it a copy
        outputs.append(output[0])
        return output[0].clone(), output[1]

    model.output_layer.register_forward_hook(keep)
    plain = model(ids, pos, causal, labels=labels)  # Megatron's own CE, [b, s]
    mult = model.config.mup_output_mult if case.mup else 1.0
    full = [gather_from_tensor_model_parallel_region(o).transpose(0, 1) * mult for o in outputs]
    main = full[-1]  # MTP heads call the output layer first, the main head last
    ce = F.cross_entropy(main.reshape(-1, mm.VOCAB), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(plain, ce.view(labels.shape), rtol=1e-5, atol=1e-5)
    ref = plain + WEIGHT * ntl_loss(main, labels, vocab, "was", reduction="none")
    total = ref.sum()
    mtp_logged, mtp_labels = [], labels
    mask = torch.ones_like(labels, dtype=torch.float32)
    for logits in full[:-1]:
        mtp_labels, mask = rolled(mtp_labels), rolled(mask)
        ce = F.cross_entropy(logits.reshape(-1, mm.VOCAB), mtp_labels.reshape(-1),
                             reduction="none").view(labels.shape)
        ntl = ntl_loss(logits, mtp_labels, vocab, "was", reduction="none")
        mtp_logged.append(((ce + WEIGHT * ntl * include_mtp) * mask).sum() / mask.sum())
        if include_mtp:  # what MTPLossAutoScaler adds to the gradient for the NTL part
            scale = model.config.mtp_loss_scaling_factor / case.mtp_layers
            total = total + scale * (WEIGHT * ntl * mask).sum() / mask.sum()
    total.backward()
    return ref.detach(), [v.detach() for v in mtp_logged], mm.grads(model)


def run_patched(case, data, train=True, processor=None):
    ids, pos, causal, labels = data
    model = case.model()
    model.train(train)
    gemms = count_head_gemms(model)
    tracker = mm.mtp_tracker()
    if tracker is not None:
        tracker.zero_()
    extra = {} if processor is None else {"output_processor": processor}
    with mm.recorded_ce_ntl() as calls:
        loss = model(ids, pos, causal, labels=labels, **extra)
    if train:
        loss.sum().backward()
    return model, loss, calls, gemms


def check_case(case, vocab, data, fused, include_mtp, train, ref, errors):
    """The patched model against the reference; asserts and records the errors."""
    import ntl_deepspeed.patches.megatron_core as patch

    ref_loss, ref_mtp, ref_grads = ref
    patch.apply(vocab, NTLConfig(weight=WEIGHT, fused_head=fused, fused_block_size=5,
                                 fused_token_chunk=7), include_mtp=include_mtp)
    model, loss, calls, gemms = run_patched(case, data, train)
    heads = case.mtp_layers or 0
    name = f"{case.name} fused={fused} include_mtp={include_mtp} {'train' if train else 'eval'}"
    # which path ran: MTP heads on logits (NTL only with include_mtp), the main head on hidden
    # states when fused -- and then the output layer's GEMM ran for the MTP heads only
    assert calls == ["logits"] * (heads if include_mtp else 0) + \
        ["hidden" if fused else "logits"], (name, calls)
    assert len(gemms) == heads + (0 if fused else 1), (name, gemms)
    loss_err = float((loss.detach() - ref_loss).abs().max())
    assert loss_err < TOL, (name, loss_err)
    mtp_err, mtp_value = float("nan"), float("nan")
    if heads and train:  # Megatron logs MTP losses in training mode only
        logged = mm.mtp_tracker()
        mtp_err = max(float((logged[i] - ref_mtp[i]).abs()) for i in range(heads))
        assert mtp_err < TOL, (name, mtp_err, logged, ref_mtp)
        mtp_value = float(logged[0])
    grad_err = mm.grad_error(model, ref_grads) if train else float("nan")
    errors.append(f"ERR {mm.version()} {name}: loss={loss_err:.1e} grad={grad_err:.1e} "
                  f"mtp={mtp_err:.1e} (logged {mtp_value:.4f})")
    return model, loss


def output_processor_cases(case, vocab, data, ref, errors):
    """NTLOutputProcessor (no patch) == the patch == the reference: losses and gradients."""
    import ntl_deepspeed.patches.megatron_core as patch
    from ntl_deepspeed.patches.megatron_output_processor import NTLOutputProcessor

    ref_loss, _, ref_grads = ref
    for fused in (False, True):
        cfg = NTLConfig(weight=WEIGHT, fused_head=fused, fused_block_size=5, fused_token_chunk=7)
        patch.apply(vocab, cfg)
        patched, patched_loss, _, _ = run_patched(case, data)
        patch.remove()
        processor = NTLOutputProcessor(vocab, cfg)
        model, loss, calls, gemms = run_patched(case, data, processor=processor)
        name = f"{case.name} output_processor fused={fused}"
        assert calls == ["hidden" if fused else "logits"], (name, calls)
        assert len(gemms) == (case.mtp_layers or 0) + (0 if fused else 1), (name, gemms)
        vs_patch = float((loss - patched_loss).detach().abs().max())
        grad_vs_patch = mm.grad_error(model, mm.grads(patched))
        loss_err = float((loss.detach() - ref_loss).abs().max())
        grad_err = mm.grad_error(model, ref_grads)
        assert max(vs_patch, loss_err) < TOL, (name, vs_patch, loss_err)
        entry = processor.report_entry(torch.ones_like(data[3], dtype=torch.float32))
        assert entry[1].item() == sum((data[3] == i).sum().item() for i in mm.NUMBER_IDS)
        errors.append(f"ERR {mm.version()} {name}: loss={loss_err:.1e} grad={grad_err:.1e} "
                      f"vs_patch loss={vs_patch:.1e} grad={grad_vs_patch:.1e}")
        # without labels the hook returns the logits as Megatron does ([b, s, V/tp])
        logits = model(*data[:3], output_processor=processor)
        assert logits.shape == (*data[3].shape, mm.VOCAB // torch.distributed.get_world_size())


def refusals(vocab, data):
    """Never a silent fallback: a logit transformation the fused head cannot fold in is refused
    with an error naming the reason, not computed on materialised logits."""
    import ntl_deepspeed.patches.megatron_core as patch

    ids, pos, causal, labels = data
    patch.apply(vocab, NTLConfig(weight=WEIGHT, fused_head=True))
    if mm.has_mup():  # a logit soft-cap in Megatron's scaling hook (not a constant factor)
        model = mm.build_gpt()
        model._scale_logits = lambda logits: 30.0 * torch.tanh(logits / 30.0)
        with pytest.raises(ValueError, match="not a constant factor"):
            model(ids, pos, causal, labels=labels)
    model = mm.build_gpt()  # a forward hook that transforms the output layer's result
    model.output_layer.register_forward_hook(lambda m, i, o: (o[0] * 2.0, o[1]))
    with pytest.raises(RuntimeError, match="refusing to fall back silently"):
        model(ids, pos, causal, labels=labels)
    patch.remove()


def patched_symbols():
    """Every function object the patch replaces, as Megatron currently has it."""
    from ntl_deepspeed.patches import megatron_compat

    megatron = megatron_compat.detect()
    found = {target: vars(owner)[name] for owner, name, target in megatron.scopes}
    found.update({m.__name__: m.process_mtp_loss for m in megatron.mtp_modules})
    found["loss"] = vars(megatron.language_module)["compute_language_model_loss"]
    return found


def worker(rank, world):
    from megatron.core import parallel_state

    import ntl_deepspeed.patches.megatron_core as patch

    mm.cpu_shims()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    originals = patched_symbols()
    errors = []
    try:
        vocab = NumberVocab.from_tokens(mm.TOKENS)
        data = mm.batch()
        cases = [Case("GPT+MTP", mm.build_gpt, mtp_layers=1)]
        if mm.has_hybrid():
            hybrid = mm.hybrid_classes()[0].__name__.replace("Model", "")  # 0.17: Mamba
            cases = [Case(hybrid, mm.build_hybrid), Case(f"{hybrid}+MTP", mm.build_hybrid, 1),
                     *cases]
        if mm.has_mup():
            cases += [Case("GPT+MTP+MuP", mm.build_gpt, 1, mup=True)]
            if mm.has_hybrid():
                cases += [Case(f"{hybrid}+MTP+MuP", mm.build_hybrid, 1, mup=True)]
        if mm.has_hybrid():  # last: its norm shim stays installed
            cases += [Case(f"{hybrid}+MTP+SP", mm.build_hybrid, 1, sequence_parallel=True)]
        for case in cases:
            if case.sequence_parallel:
                mm.torch_norm_with_sequence_parallel()
            for include_mtp in ((False, True) if case.mtp_layers else (False,)):
                ref = reference(case, vocab, data, include_mtp)
                for fused in (False, True):
                    check_case(case, vocab, data, fused, include_mtp, True, ref, errors)
                check_case(case, vocab, data, True, include_mtp, False, ref, errors)
            patch.remove()
            if mm.has_output_processor() and case.build is mm.build_gpt:
                output_processor_cases(case, vocab, data, reference(case, vocab, data, False),
                                       errors)
        refusals(vocab, data)
        patch.apply(vocab)
        assert all(patched_symbols()[k] is not f for k, f in originals.items())
        patch.remove()
        assert patched_symbols() == originals  # Megatron's own function objects again
        if rank == 0:
            print("\n".join(errors), flush=True)
    finally:
        patch.remove()
        parallel_state.destroy_model_parallel()


def test_models_tp2_equal_reference():
    run_distributed(worker, 2, timeout=600)


def cpu_pipeline_shims():
    """Test-only: megatron-core's pipeline schedules allocate their token counter with
    ``device="cuda"`` (``pipeline_parallel/schedules.py``: ``torch.zeros([], dtype=torch.int,
    device="cuda")``); on CPU that counter is made on the CPU. Nothing else of the schedule is
    changed."""
    from megatron.core.pipeline_parallel import schedules

    class TorchOnCPU:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def zeros(*args, device=None, **kwargs):
            return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)

    schedules.torch = TorchOnCPU()
    torch.cuda.synchronize = lambda *a, **k: None


def pipeline_stage(rank):
    """Stage ``rank`` of a 2-layer GPTModel split over 2 pipeline stages (same seed: the same
    weights in every run)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    torch.manual_seed(rank)
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                            use_cpu_initialization=True, params_dtype=torch.float32,
                            pipeline_dtype=torch.float32, hidden_dropout=0.0,
                            attention_dropout=0.0, pipeline_model_parallel_size=2)
    return GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(),
                    vocab_size=mm.VOCAB, max_sequence_length=16, pre_process=rank == 0,
                    post_process=rank == 1, share_embeddings_and_output_weights=False)


def run_pipeline(rank, per_token_loss):
    """Megatron's 1F1B schedule over 2 microbatches of one sequence; ``per_token_loss(output,
    labels)`` -> [b, s] on the last stage. Returns (the stage's model, its reduced losses)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = pipeline_stage(rank)
    ids, pos, causal, labels = mm.batch()
    micro = [(ids[i:i + 1], pos[i:i + 1], causal, labels[i:i + 1]) for i in range(2)]

    def forward_step(data, model):
        i, p, c, l = next(data)
        output = model(i, p, c, labels=l if per_token_loss is None else None)

        def loss_func(output_tensor):
            loss = (output_tensor if per_token_loss is None else
                    per_token_loss(output_tensor, l)).float().mean()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro), model=[model],
        num_microbatches=2, seq_length=12, micro_batch_size=1, forward_only=False)
    return model, [d["loss"] for d in losses]


def worker_pipeline(rank, world):
    """The patch on a 2-stage pipeline: the first stage is untouched (no loss call, no op),
    the last computes CE + NTL; losses and every parameter gradient of both stages equal the
    unpatched pipeline whose last stage returns logits and computes F.cross_entropy +
    0.3 * ntl_loss on them."""
    from megatron.core import parallel_state

    import ntl_deepspeed.patches.megatron_core as patch

    mm.cpu_shims()
    cpu_pipeline_shims()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1,
                                             pipeline_model_parallel_size=2)
    vocab = NumberVocab.from_tokens(mm.TOKENS)

    def reference_loss(logits, labels):  # [b, s, V], full vocab (TP = 1)
        ce = F.cross_entropy(logits.reshape(-1, mm.VOCAB), labels.reshape(-1), reduction="none")
        return ce.view(labels.shape) + WEIGHT * ntl_loss(logits, labels, vocab, "was",
                                                         reduction="none")

    try:
        ref_model, ref_losses = run_pipeline(rank, reference_loss)
        ref_grads = mm.grads(ref_model)
        for fused in (False, True):
            patch.apply(vocab, NTLConfig(weight=WEIGHT, fused_head=fused, fused_block_size=5))
            with mm.recorded_ce_ntl() as calls:
                model, losses = run_pipeline(rank, None)  # with labels: the per-token loss
            expected = ["hidden" if fused else "logits"] * 2 if rank == 1 else []
            assert calls == expected, (rank, calls)
            grad_err = mm.grad_error(model, ref_grads)
            loss_err = max([float((a - b).abs()) for a, b in zip(losses, ref_losses)] or [0.0])
            assert len(losses) == len(ref_losses) == (2 if rank == 1 else 0)
            assert loss_err < TOL, (rank, fused, loss_err)
            values = [round(float(v), 4) for v in losses]
            print(f"ERR {mm.version()} pipeline stage {rank} fused={fused}: loss={loss_err:.1e} "
                  f"grad={grad_err:.1e} (losses {values})", flush=True)
    finally:
        patch.remove()
        parallel_state.destroy_model_parallel()


def test_pipeline_two_stages_equal_reference():
    run_distributed(worker_pipeline, 2, timeout=300)
