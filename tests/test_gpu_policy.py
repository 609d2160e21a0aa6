"""GPU policies proved on CPU: accelerator/backend choice, GEMM operand dtype of the fused head,
kernel backend resolution."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ntl_deepspeed import NTLConfig, NumberVocab, ce_ntl, ntl_loss  # noqa: F401
from ntl_deepspeed.train import device
from ntl_deepspeed.ops.hidden import Blocking
from ntl_deepspeed.ops.logits import resolve_backend


@pytest.mark.parametrize("cuda,explicit,expected", [
    (True, None, ("cuda", "nccl")), (False, None, ("cpu", "gloo")),
    (True, "cpu", ("cpu", "gloo")), (False, "cuda", ("cuda", "nccl"))])
def test_accelerator_and_backend_chosen_in_one_place(monkeypatch, cuda, explicit, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    if explicit:
        monkeypatch.setenv("DS_ACCELERATOR", explicit)
    assert (device.accelerator(), device.backend()) == expected
    assert device.configure() == expected[0]
    import os

    assert os.environ["DS_ACCELERATOR"] == expected[0]  # DeepSpeed will agree


class GemmOperands(TorchDispatchMode):
    """Records the operand dtypes of every matrix product with a ``[*, block]`` or
    ``[block, *]`` operand (the head's GEMMs; the small number-token products are not)."""

    def __init__(self, block):
        super().__init__()
        self.block, self.seen = block, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
                    torch.ops.aten.mm.out):
            mats = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 2]
            if any(self.block in m.shape for m in mats[-2:]):
                self.seen.append(tuple(m.dtype for m in mats[-2:]))
        return func(*args, **(kwargs or {}))


def case(seed=0, t=24, h=16, v=40):
    tokens = [str(d) for d in range(10)] + [f"w{i}" for i in range(v - 10)]
    vocab = NumberVocab.from_tokens(tokens)
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.5
    labels = torch.randint(0, v, (t,), generator=g)
    labels[::3] = torch.randint(0, 10, (len(labels[::3]),), generator=g)
    return vocab, hidden, weight, labels


def test_cpu_defaults_to_fp32_gemms_and_cuda_to_the_input_dtype():
    h = torch.zeros(2, 4, dtype=torch.bfloat16)
    assert Blocking.build(h, None, None, None).gemm_dtype == torch.float32
    assert Blocking.build(h.to("meta"), None, None, None).gemm_dtype == torch.bfloat16
    assert Blocking.build(h.to("meta"), None, None, None).block == 4096  # fewer, larger GEMMs
    assert Blocking.build(h, 8, 4, torch.float16).gemm_dtype == torch.float16


@pytest.mark.parametrize("kind", ["was", "mse"])
def test_bf16_gemm_policy_sees_bf16_operands_and_stays_within_bf16_tolerance(kind):
    vocab, hidden, weight, labels = case()
    config = NTLConfig(kind=kind, fused_block_size=8, fused_token_chunk=10)
    ref_h, ref_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = ref_h @ ref_w.t()
    ref = F.cross_entropy(logits, labels) + 0.3 * ntl_loss(logits, labels, vocab, kind)
    ref.backward()

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with GemmOperands(block=8) as mode:
        out = ce_ntl(labels, vocab, config, hidden=h, head_weight=w, gemm_dtype=torch.bfloat16)
        out.loss.backward()
    assert mode.seen and all(d == (torch.bfloat16, torch.bfloat16) for d in mode.seen)
    torch.testing.assert_close(out.loss, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=5e-2, atol=2e-2)
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=5e-2, atol=2e-2)

    with GemmOperands(block=8) as mode:  # the CPU default: fp32 operands
        ce_ntl(labels, vocab, config, hidden=hidden, head_weight=weight)
    assert mode.seen and all(d == (torch.float32, torch.float32) for d in mode.seen)


def test_kernel_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("torch", cpu) == "torch"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="triton"):
        resolve_backend("triton", cpu)
    with pytest.raises(ValueError, match="ntl.backend"):
        NTLConfig(backend="cuda")
