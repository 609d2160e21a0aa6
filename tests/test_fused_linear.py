"""The fused (never materialised) head against the materialised op, on real gloo processes."""

import pytest
import torch
import torch.distributed as dist

from dist_utils import recorded_collectives, run_distributed
from ntl_deepspeed import NTLConfig, NumberVocab, fused_linear_ce_ntl, vocab_parallel_ce_ntl
from ntl_deepspeed.numbers import partition_bounds

V, H, T = 37, 16, 24
CONFIGS = [NTLConfig(kind="was"), NTLConfig(kind="was", reweigh=True, squash_factor=3.0),
           NTLConfig(kind="mse", reweigh=True), NTLConfig(kind="huber"),
           NTLConfig(kind="number_level")]


def make_case(seed, dtype=torch.float32):
    tokens = [f"w{i}" for i in range(V)]
    for d, i in enumerate([3, 7, 11, 14, 19, 23, 26, 30, 33, 36]):
        tokens[i] = str(d)
    vocab = NumberVocab.from_tokens(tokens)
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, T // 2, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    bias = torch.randn(V, generator=g)
    labels = torch.randint(0, V, (2, T // 2), generator=g)
    numeric = torch.rand(2, T // 2, generator=g) < 0.5
    labels[numeric] = vocab.number_ids[torch.randint(0, 10, (int(numeric.sum()),), generator=g)]
    labels[0, 0] = -100
    return vocab, hidden.to(dtype), weight.to(dtype), bias.to(dtype), labels


def check(rank, world, bounds, dtype, tol, block, token_chunk=2048):
    group = dist.group.WORLD if world > 1 else None
    start, end = bounds[rank]
    for seed, cfg in enumerate(CONFIGS):
        for with_bias in (False, True):
            vocab, hidden, weight, bias, labels = make_case(seed, dtype)
            h1 = hidden.clone().requires_grad_()
            w1 = weight[start:end].clone().requires_grad_()
            b1 = bias[start:end].clone().requires_grad_() if with_bias else None
            fused = fused_linear_ce_ntl(h1, w1, labels, vocab, group, cfg, bias=b1,
                                        vocab_start_index=start, block_size=block,
                                        token_chunk=token_chunk)
            fused.loss.backward()
            # the unsharded, materialised path on one process (fp32)
            h2 = hidden.float().clone().requires_grad_()
            w2 = weight.float().clone().requires_grad_()
            b2 = bias.float().clone().requires_grad_() if with_bias else None
            logits = h2 @ w2.t() + (b2 if with_bias else 0)
            ref = vocab_parallel_ce_ntl(logits, labels, vocab, None, cfg)
            ref.loss.backward()
            msg = f"{cfg} bias={with_bias} rank={rank}/{world} {dtype}"
            torch.testing.assert_close(fused.loss.float(), ref.loss, rtol=tol, atol=tol, msg=msg)
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
    check(0, 1, [(0, V)], torch.float32, 1e-5, block=8)
    check(0, 1, [(0, V)], torch.float32, 1e-5, block=8, token_chunk=5)  # 24 tokens: 5,..,5,4
    check(0, 1, [(0, V)], torch.bfloat16, 2e-2, block=16)
    check(0, 1, [(0, V)], torch.bfloat16, 2e-2, block=16, token_chunk=7)


def worker(rank, world, uneven):
    bounds = partition_bounds(V, world)
    if uneven:
        bounds = [(0, 5), (5, 30), (30, V)][:world]
    check(rank, world, bounds, torch.float32, 1e-5, block=8, token_chunk=7)
    # the collective contract: 2 all-reduces in forward, none in backward
    vocab, hidden, weight, _, labels = make_case(0)
    start, end = bounds[rank]
    h = hidden.clone().requires_grad_()
    with recorded_collectives() as calls:
        out = fused_linear_ce_ntl(h, weight[start:end], labels, vocab, dist.group.WORLD,
                                  vocab_start_index=start, block_size=8)
        forward_calls = list(calls)
        out.loss.backward()
    assert forward_calls == ["all_reduce", "all_reduce"] and calls == forward_calls, calls


@pytest.mark.parametrize("world,uneven", [(2, False), (3, True)])
def test_tensor_parallel_matches_materialised(world, uneven):
    run_distributed(worker, world, uneven)


def test_bad_shapes():
    vocab, hidden, weight, bias, labels = make_case(0)
    with pytest.raises(ValueError, match="must be \\[V_local, 16\\]"):
        fused_linear_ce_ntl(hidden, weight[:, :8], labels, vocab)
    with pytest.raises(ValueError, match="do not match"):
        fused_linear_ce_ntl(hidden[:, :3], weight, labels, vocab)
    with pytest.raises(ValueError, match="block_size=0"):
        fused_linear_ce_ntl(hidden, weight, labels, vocab, block_size=0)
    with pytest.raises(ValueError, match="token_chunk=0"):
        fused_linear_ce_ntl(hidden, weight, labels, vocab, token_chunk=0)
