"""The fused (never materialised) head -- ``ce_ntl(hidden=..., head_weight=...)`` -- against
the reference (F.cross_entropy + the single-device NTL) on the materialised logits, on one
process and on real gloo processes."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from cases import V, vocab37
from dist_utils import recorded_collectives, run_distributed
from ntl_deepspeed import NTLConfig, ce_ntl, ntl_loss
from ntl_deepspeed.numbers import partition_bounds

H, T = 16, 24
CONFIGS = [NTLConfig(kind="was"), NTLConfig(kind="was", reweigh=True, squash_factor=3.0),
           NTLConfig(kind="mse", reweigh=True), NTLConfig(kind="huber"),
           NTLConfig(kind="number_level")]


def make_case(seed, dtype=torch.float32):
    vocab = vocab37()
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, T // 2, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    bias = torch.randn(V, generator=g)
    labels = torch.randint(0, V, (2, T // 2), generator=g)
    numeric = torch.rand(2, T // 2, generator=g) < 0.5
    labels[numeric] = vocab.number_ids[torch.randint(0, 10, (int(numeric.sum()),), generator=g)]
    labels[0, 0] = -100
    return vocab, hidden.to(dtype), weight.to(dtype), bias.to(dtype), labels


def reference_loss(logits, labels, vocab, cfg):
    """F.cross_entropy + weight * the single-device NTL (checked against ntloss elsewhere)."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    return ce + cfg.weight * ntl_loss(logits, labels, vocab, cfg.kind, reweigh=cfg.reweigh,
                                      squash_factor=cfg.squash_factor)


def check(rank, world, bounds, dtype, tol, block=None, token_chunk=None, gemm_dtype=None):
    group = dist.group.WORLD if world > 1 else None
    start, end = bounds[rank]
    for seed, cfg in enumerate(CONFIGS):
        for with_bias in (False, True):
            vocab, hidden, weight, bias, labels = make_case(seed, dtype)
            h1 = hidden.clone().requires_grad_()
            w1 = weight[start:end].clone().requires_grad_()
            b1 = bias[start:end].clone().requires_grad_() if with_bias else None
            shard = vocab.shard_for(end - start, group, start if world > 1 else None)
            fused = ce_ntl(labels, shard, cfg.replace(fused_block_size=block,
                                                      fused_token_chunk=token_chunk),
                           hidden=h1, head_weight=w1, head_bias=b1, gemm_dtype=gemm_dtype)
            fused.loss.backward()
            # the unsharded, materialised logits on one process (fp32), through the reference
            h2 = hidden.float().clone().requires_grad_()
            w2 = weight.float().clone().requires_grad_()
            b2 = bias.float().clone().requires_grad_() if with_bias else None
            logits = h2 @ w2.t() + (b2 if with_bias else 0)
            ref = reference_loss(logits, labels, vocab, cfg)
            ref.backward()
            msg = f"{cfg} bias={with_bias} rank={rank}/{world} {dtype} {gemm_dtype}"
            torch.testing.assert_close(fused.loss.float(), ref, rtol=tol, atol=tol, msg=msg)
            g_hidden = h1.grad.float().clone()
            if world > 1:  # each rank holds its vocab slice's partial: the TP region sums them
                dist.all_reduce(g_hidden)
            scale = float(h2.grad.abs().max())
            torch.testing.assert_close(g_hidden, h2.grad, rtol=tol, atol=tol * scale, msg=msg)
            scale = float(w2.grad.abs().max())
            torch.testing.assert_close(w1.grad.float(), w2.grad[start:end], rtol=tol,
                                       atol=tol * scale, msg=msg)
            if with_bias:
                torch.testing.assert_close(b1.grad.float(), b2.grad[start:end], rtol=tol,
                                           atol=tol * float(b2.grad.abs().max()), msg=msg)


def test_single_device_fp32_and_bf16():
    check(0, 1, [(0, V)], torch.float32, 1e-5)  # the CPU defaults: one block, one chunk
    check(0, 1, [(0, V)], torch.float32, 1e-5, block=8)
    check(0, 1, [(0, V)], torch.float32, 1e-5, block=8, token_chunk=5)  # 24 tokens: 5,..,5,4
    check(0, 1, [(0, V)], torch.bfloat16, 2e-2, block=16)
    check(0, 1, [(0, V)], torch.bfloat16, 2e-2, block=16, token_chunk=7)
    # bf16 GEMM operands for fp32 inputs (CUDA's default for bf16 models), fp32 statistics
    check(0, 1, [(0, V)], torch.float32, 2e-2, block=16, gemm_dtype=torch.bfloat16)
    # bf16 weight and GEMMs (CUDA's default): one chunk writes the bf16 weight gradient directly
    check(0, 1, [(0, V)], torch.bfloat16, 2e-2, block=16, gemm_dtype=torch.bfloat16)


def worker(rank, world, uneven):
    bounds = partition_bounds(V, world)
    if uneven:
        bounds = [(0, 5), (5, 30), (30, V)][:world]
    check(rank, world, bounds, torch.float32, 1e-5, block=8, token_chunk=7)
    # the collective contract: 2 all-reduces in forward, none in backward
    vocab, hidden, weight, _, labels = make_case(0)
    start, end = bounds[rank]

    def collectives(config):  # (in forward, in forward + backward)
        h = hidden.clone().requires_grad_()
        with recorded_collectives() as calls:
            out = ce_ntl(labels, vocab.shard_for(end - start, dist.group.WORLD, start), config,
                         hidden=h, head_weight=weight[start:end])
            forward_calls = list(calls)
            out.loss.backward()
        return forward_calls, list(calls)

    forward_calls, calls = collectives(NTLConfig(fused_block_size=8))
    assert forward_calls == ["all_reduce", "all_reduce"] and calls == forward_calls, calls
    # the reduced loss's gradients come from the forward: its 2 all-reduces run per token chunk
    forward_calls, calls = collectives(NTLConfig(fused_token_chunk=7))
    assert forward_calls == ["all_reduce"] * 8 and calls == forward_calls, calls  # 24 = 7+7+7+3


@pytest.mark.parametrize("world,uneven", [(2, False), (3, True)])
def test_tensor_parallel_matches_reference(world, uneven):
    run_distributed(worker, world, uneven)


def test_bad_shapes():
    vocab, hidden, weight, bias, labels = make_case(0)
    with pytest.raises(ValueError, match="must be \\[V_local, 16\\]"):
        ce_ntl(labels, vocab, hidden=hidden, head_weight=weight[:, :8])
    with pytest.raises(ValueError, match="do not match"):
        ce_ntl(labels, vocab, hidden=hidden[:, :3], head_weight=weight)
    with pytest.raises(ValueError, match="ntl.fused_block_size=0: must be >= 1"):
        NTLConfig(fused_block_size=0)
    with pytest.raises(ValueError, match="ntl.fused_token_chunk=0: must be >= 1"):
        NTLConfig(fused_token_chunk=0)


@pytest.mark.parametrize("gemm_dtype", [None, torch.bfloat16])
def test_number_correct_of_the_fused_head(gemm_dtype):
    """number_correct from hidden states equals the unique argmax over the materialised number
    logits (rows whose top two number logits are within rounding are left out)."""
    vocab, _, _, _, _ = make_case(0)
    g = torch.Generator().manual_seed(5)
    tokens = 256
    hidden = torch.randn(2, tokens // 2, H, generator=g)
    weight, bias = torch.randn(V, H, generator=g) * 0.5, torch.randn(V, generator=g)
    zn = (hidden @ weight.t() + bias)[..., vocab.number_ids]
    top2 = zn.topk(2, -1).values
    clear = (top2[..., 0] - top2[..., 1]) > (0.05 if gemm_dtype is None else 0.5)
    winner = vocab.number_ids[zn.argmax(-1)]
    other = vocab.number_ids[torch.randint(0, 10, winner.shape, generator=g)]
    labels = torch.where(torch.rand(winner.shape, generator=g) < 0.7, winner, other)
    expected = labels == winner
    out = ce_ntl(labels, vocab, NTLConfig(fused_block_size=8), hidden=hidden, head_weight=weight,
                 head_bias=bias, gemm_dtype=gemm_dtype)
    assert int(expected[clear].sum()) > 80
    missed = int((expected & ~out.number_correct)[clear].sum())
    extra = int((~expected & out.number_correct)[clear].sum())
    assert (missed, extra) == (0, 0), f"of {int(clear.sum())} clear rows, {missed} winners " \
                                      f"not 'correct', {extra} losers 'correct'"


def _both_paths(labels, vocab, cfg, hidden, weight, bias, differentiate, **kwargs):
    """``differentiate(out)`` backpropagated through the fused head and through the materialised
    logits path; returns the two (value, grads) pairs."""
    results = []
    for fused in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        b = bias.clone().requires_grad_()
        if fused:
            out = ce_ntl(labels, vocab, cfg, hidden=h, head_weight=w, head_bias=b, **kwargs)
        else:
            out = ce_ntl(labels, vocab, cfg, logits=h @ w.t() + b, **kwargs)
        value = differentiate(out)
        value.backward()
        results.append((value.detach(), h.grad, w.grad, b.grad))
    return results


@pytest.mark.parametrize("reduction,normalization,weighted", [
    ("mean", "micro_batch", False), ("mean", "token", True), ("mean", "global", True),
    ("sum", "micro_batch", True)])
def test_reduced_loss_gradients_from_the_forward(reduction, normalization, weighted):
    """The reduced loss (gradients computed in the forward), also combined with per-token
    outputs (their gradients recomputed in the backward), against the materialised path."""
    vocab, hidden, weight, bias, labels = make_case(3)
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(1)) * 2 \
        if weighted else None
    cfg = NTLConfig(kind="was", reweigh=True, normalization=normalization, fused_token_chunk=5)
    for differentiate in (lambda o: o.loss,
                          lambda o: 0.5 * o.loss + (o.ce_per_token * 0.3).sum() + o.ntl,
                          lambda o: o.predicted_value.sum() + 2 * o.number_mass.sum()):
        fused, ref = _both_paths(labels, vocab, cfg, hidden, weight, bias, differentiate,
                                 loss_weights=weights, reduction=reduction)
        for got, want in zip(fused, ref):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing(use_reentrant):
    """Under checkpointing the head's forward runs twice (the first time without grad for the
    reentrant variant); the gradients equal those of a plain run."""
    from torch.utils.checkpoint import checkpoint

    vocab, hidden, weight, bias, labels = make_case(4)
    cfg = NTLConfig(kind="mse", reweigh=True, fused_token_chunk=7)
    grads = []
    for wrapped in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()

        def loss(h, w):
            return ce_ntl(labels, vocab, cfg, hidden=h * 1.0, head_weight=w).loss

        value = checkpoint(loss, h, w, use_reentrant=use_reentrant) if wrapped else loss(h, w)
        value.backward()
        grads.append((value.detach(), h.grad, w.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_no_gradient_work_without_grad():
    """No grad (evaluation, the first pass of reentrant checkpointing): one head GEMM per
    vocab block, no gradient GEMMs; with grad: three head GEMMs over the whole shard."""
    from op_counter import count_dispatched_ops

    vocab, hidden, weight, _, labels = make_case(0)
    cfg = NTLConfig(kind="was", fused_block_size=8, fused_token_chunk=24)

    def run(grad):
        h, w = hidden.clone().requires_grad_(grad), weight.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            out = ce_ntl(labels, vocab, cfg, hidden=h, head_weight=w)
        if grad:
            out.loss.backward()

    def head_gemms(per_op):
        return sum(n for op, n in per_op.items() if op.split(".")[1] in ("mm", "addmm", "addmm_"))
    _, _, without = count_dispatched_ops(run, False)
    _, _, with_grad = count_dispatched_ops(run, True)
    assert head_gemms(without) == 5 + 1  # 37 columns in blocks of 8, + the number columns
    assert head_gemms(with_grad) == 3  # logits, hidden gradient, weight gradient


def test_second_backward_is_refused():
    vocab, hidden, weight, _, labels = make_case(0)
    h = hidden.clone().requires_grad_()
    out = ce_ntl(labels, vocab, NTLConfig(), hidden=h, head_weight=weight)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward through the same graph"):
        out.loss.backward()
