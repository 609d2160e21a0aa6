"""Tiny megatron-core models on CPU for the Megatron tests (TP from the world size), and the
test-only shims they need there. Works on megatron-core 0.16 to 0.19; what a version lacks is
reported by the ``HAS_*`` probes."""
import contextlib
import inspect

import torch

VOCAB = 64
TOKENS = ["<unk>", "<s>", "</s>", "."] + [str(d) for d in range(10)] + \
         [f"w{i}" for i in range(VOCAB - 14)]
NUMBER_IDS = range(4, 14)


def version() -> str:
    from megatron.core import package_info

    return package_info.__version__.split("+")[0]


def hybrid_classes():
    """(model class, stack class, stack submodules class, module naming TENorm, spec keyword)
    of the hybrid model with inline post-processing and MTP patterns: HybridModel (0.18+), or
    0.17's MambaModel (its predecessor); None before."""
    try:
        from megatron.core.models.hybrid import hybrid_block, hybrid_model

        return (hybrid_model.HybridModel, hybrid_block.HybridStack,
                hybrid_block.HybridStackSubmodules, hybrid_block, "hybrid_stack_spec")
    except ImportError:
        pass
    try:
        from megatron.core.models.mamba import mamba_model
        from megatron.core.ssm import mamba_block
    except ImportError:
        return None
    if not hasattr(mamba_model, "process_mtp_loss"):  # 0.16: no MTP patterns
        return None
    return (mamba_model.MambaModel, mamba_block.MambaStack, mamba_block.MambaStackSubmodules,
            mamba_block, "mamba_stack_spec")


def has_hybrid() -> bool:
    return hybrid_classes() is not None


def has_mup() -> bool:
    from megatron.core.transformer import TransformerConfig

    return "use_mup" in {f.name for f in __import__("dataclasses").fields(TransformerConfig)}


def has_output_processor() -> bool:
    from megatron.core.models.gpt.gpt_model import GPTModel

    return "output_processor" in inspect.signature(GPTModel.forward).parameters


def cpu_shims():
    """Test-only: megatron-core asks CUDA for a device and an RNG tracker; HybridModel hard-codes
    Transformer Engine's TENorm (final and MTP norms), replaced by a torch LayerNorm."""
    torch.cuda.current_device = lambda: "cpu"
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    if has_hybrid():
        class TorchNorm(torch.nn.LayerNorm):
            def __init__(self, config, hidden_size, eps=1e-5):
                super().__init__(hidden_size, eps=eps)

        hybrid_classes()[3].TENorm = TorchNorm


def config(mtp_layers=None, mup=False, sequence_parallel=False, num_layers=1):
    from megatron.core.transformer import TransformerConfig

    # MuP with an explicit output multiplier (default: 1 / width_mult) large enough that a
    # dropped or doubled scale fails the tests (the tiny model's logits are small)
    extra = {"use_mup": True, "mup_width_mult": 2.0, "mup_output_mult": 6.0} if mup else {}
    return TransformerConfig(num_layers=num_layers, hidden_size=32, num_attention_heads=4,
                             use_cpu_initialization=True, perform_initialization=True,
                             params_dtype=torch.float32, hidden_dropout=0.0,
                             attention_dropout=0.0, mtp_num_layers=mtp_layers,
                             sequence_parallel=sequence_parallel,
                             tensor_model_parallel_size=torch.distributed.get_world_size(),
                             **extra)


def build_gpt(seed=0, mtp_layers=None, share=False, sequence_parallel=False, mup=False):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_layer_local_spec,
                                                          get_gpt_mtp_block_spec)

    torch.manual_seed(seed)
    cfg = config(mtp_layers, mup, sequence_parallel)
    spec = get_gpt_layer_local_spec()
    mtp = None if mtp_layers is None else get_gpt_mtp_block_spec(cfg, spec, False)
    return GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=VOCAB,
                    max_sequence_length=16, parallel_output=True, mtp_block_spec=mtp,
                    share_embeddings_and_output_weights=share)


def build_hybrid(seed=0, mtp_layers=None, mup=False, sequence_parallel=False):
    """HybridModel (0.17: MambaModel) with pattern "**" (two attention layers; "**/*": plus one
    MTP layer) from megatron-core's local (non-TE) GPT layer and MTP specs."""
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_layer_local_spec,
                                                          get_gpt_mtp_block_spec)
    from megatron.core.transformer.spec_utils import ModuleSpec

    model_class, stack_class, submodules_class, _, spec_keyword = hybrid_classes()

    torch.manual_seed(seed)
    cfg = config(mtp_layers, mup, sequence_parallel, num_layers=2)
    spec = get_gpt_layer_local_spec()
    mtp = None if mtp_layers is None else get_gpt_mtp_block_spec(cfg, spec, False)
    stack = ModuleSpec(module=stack_class,
                       submodules=submodules_class(attention_layer=spec, mtp_block_spec=mtp))
    return model_class(config=cfg, vocab_size=VOCAB, max_sequence_length=16,
                       parallel_output=True, hybrid_layer_pattern="**" + "/*" * (mtp_layers or 0),
                       position_embedding_type="learned_absolute", **{spec_keyword: stack})


def torch_norm_with_sequence_parallel():
    """Test-only: megatron-core's torch-LayerNorm wrapper refuses sequence parallelism (TE/Apex
    norms mark their weights for the gradient all-reduce); a plain LayerNorm lets the sequence-
    parallel path run on CPU. Per-rank gradients of replicated weights are then partial sums,
    the same in the reference and in the patched model, and compared as such. Stays installed
    for the rest of the process."""
    from megatron.core.transformer import torch_norm

    torch_norm.WrappedTorchNorm.__new__ = \
        lambda cls, config, hidden_size, eps=1e-5, **kw: torch.nn.LayerNorm(hidden_size, eps=eps)


def batch(seed=1, b=2, s=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, s), generator=g)
    labels = torch.randint(0, VOCAB, (b, s), generator=g)
    digits = torch.rand(b, s, generator=g) < 0.5
    labels[digits] = torch.randint(4, 14, (int(digits.sum()),), generator=g)
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), 1).view(1, 1, s, s)
    return ids, pos, causal, labels


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def grad_error(model, ref_grads) -> float:
    """Every parameter's gradient equals the reference's (same parameter set; rtol 1e-4, atol
    1e-5, asserted); returns the largest absolute difference."""
    got = grads(model)
    assert got.keys() == ref_grads.keys(), sorted(set(got) ^ set(ref_grads))
    for name, g in ref_grads.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-5, msg=name)
    return max(float((got[n] - g).abs().max()) for n, g in ref_grads.items())


def mtp_tracker():
    """Megatron's per-MTP-layer logged losses (renamed 'values' -> 'loss_values' in 0.19)."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    tracker = MTPLossLoggingHelper.tracker
    for key in ("loss_values", "values"):
        if key in tracker:
            return tracker[key]
    return None


@contextlib.contextmanager
def recorded_ce_ntl():
    """Yields a list receiving 'hidden' or 'logits' for every ce_ntl call of the patch/hook."""
    from ntl_deepspeed.patches import megatron_heads as heads

    real, calls = heads.ce_ntl, []

    def recording(*a, **k):
        calls.append("hidden" if k.get("hidden") is not None else "logits")
        return real(*a, **k)

    heads.ce_ntl = recording
    try:
        yield calls
    finally:
        heads.ce_ntl = real
