"""The vocab-parallel op on real gloo processes against the single-device reference."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_utils import recorded_collectives, run_distributed
from cases import V, vocab37
from ntl_deepspeed import NTLConfig, NumberVocab, ce_ntl, ntl_loss
from ntl_deepspeed.numbers import partition_bounds

make_vocab = vocab37  # layouts: "spread", "first_shard", "tail"


def make_batch(vocab, seed, shape=(3, 11)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, vocab.vocab_size, generator=g) * 2.5
    labels = torch.randint(0, vocab.vocab_size, shape, generator=g)
    numeric = torch.rand(shape, generator=g) < 0.5
    labels[numeric] = vocab.number_ids[torch.randint(0, 10, (int(numeric.sum()),), generator=g)]
    labels[0, 0] = labels[-1, -1] = -100
    weights = torch.rand(shape, generator=g) * 2
    return logits, labels, weights


def broadcast_from_rank0(*tensors):
    for t in tensors if dist.is_initialized() else ():
        dist.broadcast(t, src=0)
    return tensors


def reference(logits, labels, vocab, cfg, weights):
    """CE (F.cross_entropy) + weight * NTL (our single-device reference) with the same weights."""
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                         reduction="none").view(labels.shape)
    w = torch.ones_like(ce) if weights is None else weights
    valid = (labels != -100).float()
    ce_mean = (ce * w * valid).sum() / (w * valid).sum()
    ntl = ntl_loss(logits, labels, vocab, cfg.kind, reweigh=cfg.reweigh,
                   squash_factor=cfg.squash_factor, loss_weights=weights,
                   float_level=cfg.float_level)
    return ce_mean + cfg.weight * ntl, ce_mean, ntl


CONFIGS = [NTLConfig(kind="was"), NTLConfig(kind="was", reweigh=True),
           NTLConfig(kind="was", squash_factor=3.0, reweigh=True), NTLConfig(kind="mse"),
           NTLConfig(kind="mse", reweigh=True), NTLConfig(kind="l1"), NTLConfig(kind="huber"),
           NTLConfig(kind="number_level"), NTLConfig(kind="number_level", reweigh=True,
                                                     float_level=True)]


def check_against_reference(rank, world, vocab, bounds, dtype, tol, pass_start=True):
    """``pass_start=False``: the shard finds its slice itself (the even partition by rank)."""
    group = dist.group.WORLD if world > 1 else None
    start, end = bounds[rank]
    vocab_shard = vocab.shard_for(end - start, group, start if pass_start else None)
    assert (vocab_shard.start, vocab_shard.end, vocab_shard.fits) == (start, end, True)
    for seed, cfg in enumerate(CONFIGS):
        for weights_on in (False, True):
            logits, labels, weights = make_batch(vocab, seed)
            broadcast_from_rank0(logits, labels, weights)
            logits = logits.to(dtype)
            w = weights if weights_on else None
            shard = logits[..., start:end].clone().requires_grad_()
            before = shard.detach().clone()
            out = ce_ntl(labels, vocab_shard, cfg, logits=shard, loss_weights=w)
            out.loss.backward()
            assert torch.equal(shard.detach(), before), "the op modified its input logits"
            full = logits.float().requires_grad_()
            ref, ref_ce, ref_ntl = reference(full, labels, vocab, cfg, w)
            ref.backward()
            msg = f"{cfg} weights={weights_on} rank={rank}/{world} {dtype}"
            torch.testing.assert_close(out.ce, ref_ce, rtol=tol, atol=tol, msg=msg)
            torch.testing.assert_close(out.ntl, ref_ntl, rtol=tol, atol=tol, msg=msg)
            torch.testing.assert_close(out.loss, ref, rtol=tol, atol=tol, msg=msg)
            torch.testing.assert_close(shard.grad.float(), full.grad[..., start:end],
                                       rtol=tol, atol=tol * float(full.grad.abs().max()), msg=msg)
            assert shard.grad.dtype == dtype


def worker_matches_reference(rank, world, layouts, uneven):
    for layout in layouts:
        vocab = make_vocab(layout)
        bounds = partition_bounds(V, world)
        if uneven:  # a different uneven split than the default one
            cuts = sorted({0, V} | {V * (r + 1) // (world + 1) + 2 for r in range(world - 1)})
            bounds = list(zip(cuts[:-1], cuts[1:]))
        check_against_reference(rank, world, vocab, bounds, torch.float32, 1e-5, uneven)
        check_against_reference(rank, world, vocab, bounds, torch.bfloat16, 2e-2, uneven)


def test_single_device_matches_reference():
    for layout in ("spread", "tail"):
        vocab = make_vocab(layout)
        check_against_reference(0, 1, vocab, [(0, V)], torch.float32, 1e-5)
        check_against_reference(0, 1, vocab, [(0, V)], torch.float16, 2e-2)


@pytest.mark.parametrize("world,layouts,uneven", [
    (2, ("spread", "first_shard"), False),
    (3, ("spread", "tail"), True),
    (4, ("first_shard",), False),  # number tokens absent from three of four shards
])
def test_tensor_parallel_matches_reference(world, layouts, uneven):
    run_distributed(worker_matches_reference, world, layouts, uneven)


def worker_contract_and_megatron(rank, world):
    vocab = make_vocab("spread")
    start, end = partition_bounds(V, world)[rank]
    logits, labels, weights = make_batch(vocab, 7)
    broadcast_from_rank0(logits, labels, weights)

    # 1) exactly one MAX and one SUM all-reduce in forward, nothing in backward
    with recorded_collectives() as counts:
        shard = logits[..., start:end].clone().requires_grad_()
        out = ce_ntl(labels, vocab.shard_for(end - start, dist.group.WORLD),
                     NTLConfig(kind="was", reweigh=True), logits=shard)
        forward_calls = list(counts)
        out.loss.backward()
        backward_calls = counts[len(forward_calls):]
    assert forward_calls == ["all_reduce", "all_reduce"], forward_calls
    assert backward_calls == [], backward_calls

    # 2) CE against megatron-core's vocab_parallel_cross_entropy (on a copy: it writes in place)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    try:
        pad = 40  # megatron needs equal shards: pad the vocab with never-chosen ids
        padded = NumberVocab.from_tokens(
            [vocab.number_tokens.get(i, f"w{i}") for i in range(V)], vocab_size=pad)
        big = torch.cat([logits, torch.full((*logits.shape[:-1], pad - V), -30.0)], -1)
        s, e = partition_bounds(pad, world)[rank]
        ours_in = big[..., s:e].clone().requires_grad_()
        meg_in = big[..., s:e].clone().requires_grad_()
        ours = ce_ntl(labels.clamp_min(0), padded.shard_for(e - s, dist.group.WORLD, s),
                      NTLConfig(enabled=False), logits=ours_in, reduction="none")
        meg = vocab_parallel_cross_entropy(meg_in.clone(), labels.clamp_min(0))
        torch.testing.assert_close(ours.ce_per_token, meg, rtol=1e-5, atol=1e-5)
        ours.loss.sum().backward()
        meg.sum().backward()
        torch.testing.assert_close(ours_in.grad, meg_in.grad, rtol=1e-5, atol=1e-6)
    finally:
        parallel_state.destroy_model_parallel()


def test_collective_contract_and_megatron_ce():
    run_distributed(worker_contract_and_megatron, 2)


def worker_global_normalization(rank, world):
    """DP ranks with different micro-batches: averaged gradients equal the one-big-batch loss."""
    vocab = make_vocab("spread")
    logits, labels, _ = make_batch(vocab, 100 + rank, shape=(2, 9 + 4 * rank))
    x = logits.clone().requires_grad_()
    out = ce_ntl(labels, vocab.shard_for(V), NTLConfig(kind="mse", weight=1.0,
                                                       normalization="global"),
                 logits=x, dp_group=dist.group.WORLD)
    out.ntl.backward()
    grad_avg_factor = 1.0 / world  # what DP gradient averaging does
    value = out.ntl.detach().clone()
    dist.all_reduce(value)
    all_logits = [make_batch(vocab, 100 + r, shape=(2, 9 + 4 * r)) for r in range(world)]
    big_logits = torch.cat([b[0] for b in all_logits], 1).requires_grad_()
    big_labels = torch.cat([b[1] for b in all_logits], 1)
    ref = ntl_loss(big_logits, big_labels, vocab, "mse")
    ref.backward()
    torch.testing.assert_close(value / world, ref, rtol=1e-5, atol=1e-5)
    offset = sum(9 + 4 * r for r in range(rank))
    torch.testing.assert_close(x.grad * grad_avg_factor,
                               big_logits.grad[:, offset:offset + labels.shape[1]],
                               rtol=1e-5, atol=1e-7)


def test_global_normalization_equals_one_big_batch():
    run_distributed(worker_global_normalization, 2)


# ---------------------------------------------------------------------- number_correct: ties
def tie_case(seed=0, tokens=24):
    """Logits with planted ties and clear winners (rows 0-9), then rows of small integers (many
    ties); labels; and the expected ``number_correct``, computed here on the full logits."""
    vocab = make_vocab("spread")
    ids = vocab.number_ids  # [3, 7, ..., 36]; at TP 2: 3..14 on rank 0, 19..36 on rank 1
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(-2, 3, (tokens, V), generator=g).float()
    labels = ids[torch.randint(0, 10, (tokens,), generator=g)]
    z[torch.arange(tokens), labels] += torch.randint(0, 3, (tokens,), generator=g).float()
    first, last = int(ids[0]), int(ids[-1])
    planted = [  # (label, logits row, expected)
        (first, torch.zeros(V), False),                     # collapsed: all logits equal
        (last, torch.full((V,), 4.0), False),               # collapsed, label on the last rank
        (first, torch.zeros(V).index_fill(0, ids[:1], 1.0), True),    # clear winner
        (last, torch.zeros(V).index_fill(0, ids[-1:], 1.0), True),    # ... on the last rank
        (first, torch.zeros(V).index_fill(0, ids[[0, -1]], 1.0), False),  # tie across ranks
        (last, torch.zeros(V).index_fill(0, ids[[0, -1]], 1.0), False),   # the same, other label
        (last, torch.zeros(V).index_fill(0, ids[:1], 1.0), False),    # another number wins
        (int(ids[1]), torch.zeros(V).index_fill(0, ids[1:3], 2.0), False),  # tie on one rank
        (first, torch.zeros(V).index_fill(0, ids[:1], 1.0).index_fill(0, torch.tensor([0]), 9.0),
         True),                                             # a text token is higher: irrelevant
        (0, torch.zeros(V).index_fill(0, torch.tensor([0]), 1.0), False),  # text label
    ]
    for row, (label, logits_row, _) in enumerate(planted):
        labels[row], z[row] = label, logits_row
    labels[len(planted)] = -100
    # expected: the label is a number token and the only number token at the number maximum
    zn = z[:, ids]
    at_label = (ids.unsqueeze(0) == labels.unsqueeze(1))
    top = zn.max(-1, keepdim=True).values
    label_on_top, alone = ((zn == top) & at_label).any(-1), (zn == top).sum(-1) == 1
    expected = at_label.any(-1) & label_on_top & alone
    assert expected[:len(planted)].tolist() == [e for _, _, e in planted]
    rest = slice(len(planted) + 1, None)  # random rows: some correct, some tied at the top
    assert expected[rest].any() and (label_on_top & ~alone)[rest].any()
    return vocab, z.view(2, tokens // 2, V), labels.view(2, tokens // 2), \
        expected.view(2, tokens // 2)


def check_ties(rank, world):
    vocab, z, labels, expected = tie_case()
    group = dist.group.WORLD if world > 1 else None
    start, end = partition_bounds(V, world)[rank]
    shard = vocab.shard_for(end - start, group)
    for kind in ("was", "number_level"):
        out = ce_ntl(labels, shard, NTLConfig(kind=kind), logits=z[..., start:end])
        assert out.number_correct.dtype == torch.bool
        assert torch.equal(out.number_correct, expected), (kind, rank, world)
        # the hidden-state path: an identity head gives exactly the same logits
        out = ce_ntl(labels, shard, NTLConfig(kind=kind, fused_block_size=8), hidden=z,
                     head_weight=torch.eye(V)[start:end])
        assert torch.equal(out.number_correct, expected), (kind, rank, world, "hidden")


def test_ties_are_not_correct_single_device():
    check_ties(0, 1)


# ---------------------------------------------------------------------- bad shards
def worker_ties_and_bad_shards(rank, world):
    check_ties(rank, world)

    vocab = make_vocab("spread")
    logits, labels, _ = make_batch(vocab, 3)
    broadcast_from_rank0(logits, labels)
    start, end = partition_bounds(V, world)[rank]
    shard = logits[..., start:end]
    group = dist.group.WORLD
    even = vocab.shard_for(end - start, group)
    assert (even.start, even.end, even.rank, even.group_size, even.fits) == (start, end, rank,
                                                                            world, True)
    inside = vocab.number_ids[(vocab.number_ids >= start) & (vocab.number_ids < end)]
    assert torch.equal(even.number_ids + start, inside)
    checked = NTLConfig(check_inputs=True)
    # every rank must raise (none may hang): by default through a device-side assert on the
    # header all ranks share, with check_inputs through a host read naming the problem
    # 1) rank 1 claims a slice that overlaps rank 0's
    overlap = vocab.shard_for(end - start, group, start - 1 if rank == 1 else start)
    with pytest.raises(RuntimeError, match="vocab shards are inconsistent"):
        ce_ntl(labels, overlap, logits=shard)
    with pytest.raises(ValueError, match=r"vocab shards \[\(0, 19\), \(18, 36\)\] do not "
                                         r"partition \[0, 37\) in rank order"):
        ce_ntl(labels, overlap, checked, logits=shard)
    # 2) rank 0's logits are one column short of its slice of the even partition
    bad = shard[..., :-1] if rank == 0 else shard
    short = vocab.shard_for(bad.shape[-1], group)
    assert short.fits == (rank != 0)
    with pytest.raises(RuntimeError, match="vocab shards are inconsistent"):
        ce_ntl(labels, short, logits=bad)
    with pytest.raises(ValueError, match=r"rank 0: its logits shard does not fit the vocab "
                                         r"slice \[0, 19\) of a 37-token vocab"):
        ce_ntl(labels, short, checked, logits=bad)
    # 3) NaN on one rank only, with check_finite: all ranks raise with the count
    nan_shard = shard.clone()
    if rank == 1:
        nan_shard[0, 0, :3] = float("nan")
    with pytest.raises(ValueError, match=r"3 non-finite values \(per tensor-parallel rank: {1: 3}"):
        ce_ntl(labels, even, NTLConfig(check_finite=True), logits=nan_shard)
    # the group still works afterwards, and gives the reference's CE
    out = ce_ntl(labels, even, NTLConfig(enabled=False), logits=shard)
    torch.testing.assert_close(out.ce, F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1)))


def test_ties_and_bad_shards_on_two_ranks():
    run_distributed(worker_ties_and_bad_shards, 2, timeout=120)


def test_large_gradient_buffer_matches_cross_entropy():
    """A gradient above the huge-page threshold (ops/buffers.py: madvise before the first write)
    holds the same values as F.cross_entropy's (NTL off, so CE alone)."""
    from ntl_deepspeed.ops.buffers import _MIN_BYTES

    g = torch.Generator().manual_seed(0)
    rows, width = 96, _MIN_BYTES // (4 * 64)
    tokens = [f"t{i}" for i in range(width)]
    tokens[5] = "7"
    logits = (torch.randn(rows, width, generator=g) * 3).requires_grad_()
    labels = torch.randint(0, width, (rows,), generator=g)
    out = ce_ntl(labels, NumberVocab.from_tokens(tokens), NTLConfig(enabled=False), logits=logits)
    out.loss.backward()
    ref = logits.detach().clone().requires_grad_()
    torch.nn.functional.cross_entropy(ref, labels).backward()
    assert logits.grad.nbytes >= _MIN_BYTES
    torch.testing.assert_close(logits.grad, ref.grad, rtol=1e-5, atol=1e-9)
