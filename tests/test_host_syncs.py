"""No host synchronisation in a training step of ``ce_ntl`` with the default config.

One forward + backward, on logits and on hidden states, for every NTL kind (and NTL off),
reweigh on/off, with and without loss weights, at TP 1 and TP 2 (gloo): 0 host syncs counted by
tests/sync_counter.py (Tensor.item & co., data-dependent shapes: nonzero, boolean indexing,
unique, repeat_interleave without output_size). ``check_inputs`` / ``check_finite`` trade
syncs for precise errors: they must sync, which also shows that the counter sees the op's syncs.

The vocab's host tables (value range, distance span) and each layout's VocabShard are computed
once, on the host, at the first call; the counted call is the steady-state step after it.

Separately: copies that CUDA makes blocking although nothing comes back to the host
(``torch.tensor(x, device=...)``, ``t[i] = python_number``): they stall the host like a sync.
"""
import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from cases import V, vocab37
from ntl_deepspeed import NTLConfig, ce_ntl
from ntl_deepspeed.numbers import partition_bounds
from sync_counter import SYNC_METHODS, counting_host_syncs

H = 8
KINDS = ["was", "mse", "l1", "huber", "number_level", "off"]


make_vocab = vocab37  # digits on both ranks at TP 2


def make_batch(vocab, seed=0, shape=(2, 9)):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, shape, generator=g)
    numeric = torch.rand(shape, generator=g) < 0.6  # runs of digits for number_level
    labels[numeric] = vocab.number_ids[torch.randint(0, 10, (int(numeric.sum()),), generator=g)]
    labels[0, 0] = -100
    labels[1, 4] = 20  # '.' inside a number (float_level)
    return (labels, torch.randn(*shape, V, generator=g), torch.randn(*shape, H, generator=g),
            torch.randn(V, H, generator=g) * 0.5, torch.randn(V, generator=g),
            torch.rand(shape, generator=g) * 2)


def config(kind, reweigh, **kw):
    if kind == "off":
        return NTLConfig(enabled=False, reweigh=reweigh, **kw)
    return NTLConfig(kind=kind, reweigh=reweigh, **kw)


def step(labels, shard, cfg, path, batch, weights, start, end, **kwargs):
    """One forward + backward through ``ce_ntl``."""
    _, logits, hidden, weight, bias, _ = batch
    if path == "logits":
        x = logits[..., start:end].clone().requires_grad_()
        out = ce_ntl(labels, shard, cfg, logits=x, loss_weights=weights, **kwargs)
    else:
        x = hidden.clone().requires_grad_()
        w = weight[start:end].clone().requires_grad_()
        b = bias[start:end].clone().requires_grad_()
        out = ce_ntl(labels, shard, cfg, hidden=x, head_weight=w, head_bias=b,
                     loss_weights=weights, **kwargs)
    loss = out.loss if out.loss.dim() == 0 else out.loss.sum()
    loss.backward()
    return out, x.grad


def syncs_of_step(*args, **kwargs):
    """The host syncs of a steady-state step (after one warm-up step)."""
    step(*args, **kwargs)
    with counting_host_syncs() as log:
        step(*args, **kwargs)
    return log


# ---------------------------------------------------------------------- the counter itself
x = torch.arange(6.0)
mask = x > 2


@pytest.mark.parametrize("name, fn", [
    ("item", lambda: x.sum().item()),
    ("bool", lambda: bool(x.any())),
    ("if", lambda: 1 if (x > 0).all() else 0),
    ("mask_index", lambda: x[mask]),
    ("mask_assign", lambda: x.clone().__setitem__(mask, 0.0)),
    ("tolist", lambda: x.tolist()),
    ("float", lambda: float(x.sum())),
    ("int", lambda: int(x.sum())),
    ("index", lambda: [0, 1, 2][torch.tensor(1)]),
    ("local_scalar_dense", lambda: torch.ops.aten._local_scalar_dense(x[0])),
    ("nonzero", lambda: torch.nonzero(mask)),
    ("masked_select", lambda: x.masked_select(mask)),
    ("unique", lambda: torch.unique(x)),
    ("unique_consecutive", lambda: torch.unique_consecutive(x)),
    ("repeat_interleave", lambda: torch.repeat_interleave(x, torch.ones(6, dtype=torch.long))),
])
def test_counter_sees_each_sync_once(name, fn):
    with counting_host_syncs() as log:
        fn()
    assert len(log) == 1 and not log.host_to_device, log.report()
    assert __file__ in log.syncs[0].where  # the caller's line, not torch's


@pytest.mark.parametrize("name, fn, blocking", [
    ("element_store", lambda: x.clone().__setitem__(3, 5.0), True),
    ("element_store_2d", lambda: torch.zeros(2, 3).__setitem__((1, 2), 7), True),
    ("tensor_on_device", lambda: torch.tensor(10.0, device=x.device), True),
    ("as_tensor_on_device", lambda: torch.as_tensor([1.0, 2.0], device=x.device), True),
    ("slice_store", lambda: x.clone().__setitem__(slice(3, 4), 5.0), False),  # a fill kernel
    ("row_store", lambda: torch.zeros(2, 3).__setitem__(1, 7.0), False),
    ("element_fill_", lambda: x.clone()[3].fill_(5.0), False),
    ("element_from_tensor", lambda: x.clone().__setitem__(3, x[0]), False),  # device to device
    ("cpu_tensor", lambda: torch.tensor(10.0) * x, False),  # a CPU scalar operand: no copy
    ("pow_scalar", lambda: torch.pow(10.0, x), False),
])
def test_counter_sees_blocking_host_to_device_copies(name, fn, blocking):
    with counting_host_syncs() as log:
        fn()
    assert len(log) == 0 and len(log.host_to_device) == int(blocking), log.report()


@pytest.mark.parametrize("fn", [
    lambda: torch.repeat_interleave(x, torch.ones(6, dtype=torch.long), output_size=6),
    lambda: x.repeat_interleave(2),
    lambda: torch.where(mask, x, 0.0),
    lambda: x[torch.tensor([0, 2])],  # integer indices: no sync
    lambda: x.clone().index_put_((torch.tensor([1]),), torch.tensor(9.0)),
    lambda: (x * 2).sum().exp(),
])
def test_counter_ignores_sync_free_ops(fn):
    with counting_host_syncs() as log:
        fn()
    assert len(log) == 0, log.report()


def test_counter_restores_tensor_methods():
    before = {n: torch.Tensor.__dict__.get(n) for n in SYNC_METHODS}
    factories = (torch.tensor, torch.as_tensor)
    with pytest.raises(ZeroDivisionError):
        with counting_host_syncs():
            1 / 0
    assert {n: torch.Tensor.__dict__.get(n) for n in SYNC_METHODS} == before
    assert (torch.tensor, torch.as_tensor) == factories
    with counting_host_syncs() as log:
        pass
    x.sum().item()  # outside: not counted
    assert len(log) == 0


# ---------------------------------------------------------------------- one rank
@pytest.fixture(scope="module")
def case():
    vocab = make_vocab()
    return vocab, make_batch(vocab)


@pytest.mark.parametrize("path", ["logits", "hidden"])
@pytest.mark.parametrize("kind", KINDS)
def test_no_host_sync_one_rank(case, kind, path):
    vocab, batch = case
    labels, weights = batch[0], batch[-1]
    shard = vocab.shard_for(V)
    for reweigh in (False, True):
        for w in (None, weights):
            log = syncs_of_step(labels, shard, config(kind, reweigh), path, batch, w, 0, V)
            assert len(log) == 0, f"{kind} reweigh={reweigh} weights={w is not None} " \
                                  f"{path}\n{log.report()}"


@pytest.mark.parametrize("path", ["logits", "hidden"])
@pytest.mark.parametrize("cfg, kwargs", [
    (NTLConfig(kind="was", squash_factor=3.0, reweigh=True), {}),
    (NTLConfig(kind="number_level", float_level=True, reweigh=True), {}),
    (NTLConfig(kind="mse", normalization="token"), {}),
    (NTLConfig(kind="was", normalization="global"), {}),  # dp_group None: one DP rank
    (NTLConfig(kind="huber"), {"reduction": "none"}),
    (NTLConfig(kind="l1"), {"reduction": "sum"}),
    (NTLConfig(kind="was", fused_block_size=8, fused_token_chunk=5), {}),
], ids=lambda v: str(v)[:60] if isinstance(v, NTLConfig) else str(v))
def test_no_host_sync_other_options(case, cfg, kwargs, path):
    vocab, batch = case
    log = syncs_of_step(batch[0], vocab.shard_for(V), cfg, path, batch, batch[-1], 0, V,
                        **kwargs)
    assert len(log) == 0, f"{cfg} {kwargs} {path}\n{log.report()}"


def test_no_host_sync_bf16_logits(case):
    vocab, batch = case
    bf16 = (batch[0], batch[1].bfloat16(), *batch[2:])
    log = syncs_of_step(batch[0], vocab.shard_for(V), NTLConfig(reweigh=True), "logits", bf16,
                        None, 0, V)
    assert len(log) == 0, log.report()


def test_first_call_reads_only_the_vocab_host_tables():
    """The first call of a fresh vocab computes its value range / distance span (cached) from
    the vocab's own CPU tables -- never from the device."""
    vocab = make_vocab()
    batch = make_batch(vocab)
    shard = vocab.shard_for(V)
    with counting_host_syncs() as log:
        step(batch[0], shard, NTLConfig(kind="was", squash_factor=3.0, reweigh=True), "logits",
             batch, None, 0, V)
    assert all("ntl_deepspeed/numbers/" in s.where for s in log.syncs), log.report()
    assert vocab.number_values.device.type == "cpu"


@pytest.mark.parametrize("path", ["logits", "hidden"])
@pytest.mark.parametrize("kind", ["was", "number_level"])
def test_no_blocking_host_to_device_copy(case, kind, path):
    vocab, batch = case
    log = syncs_of_step(batch[0], vocab.shard_for(V), config(kind, False), path, batch,
                        batch[-1], 0, V)
    assert len(log) == 0 and len(log.host_to_device) == 0, log.report(stacks=False)


@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_checks_on_the_host_do_sync(case, path):
    """check_inputs / check_finite read labels, weights and the shard header on the host: the
    counter must see it (and the default's 0 above is not a blind spot)."""
    vocab, batch = case
    shard = vocab.shard_for(V)
    for cfg, where in [(NTLConfig(check_inputs=True), ("checks.py", "ops/header.py")),
                       (NTLConfig(check_finite=True), ("ops/header.py",))]:
        log = syncs_of_step(batch[0], shard, cfg, path, batch, batch[-1], 0, V)
        assert len(log) > 0, cfg
        assert {w for w in where if any(w in s.where for s in log.syncs)} == set(where), \
            log.report()


# ---------------------------------------------------------------------- two ranks
def worker_two_ranks(rank, world):
    vocab = make_vocab()
    batch = make_batch(vocab, seed=1)
    for t in batch:
        dist.broadcast(t, src=0)
    start, end = partition_bounds(V, world)[rank]
    shard = vocab.shard_for(end - start, dist.group.WORLD)
    labels, weights = batch[0], batch[-1]
    for kind in ("was", "number_level"):
        for reweigh in (False, True):
            for path in ("logits", "hidden"):
                for w in (None, weights):
                    log = syncs_of_step(labels, shard, config(kind, reweigh), path, batch, w,
                                        start, end)
                    assert len(log) == 0, f"rank {rank}: {kind} reweigh={reweigh} " \
                                          f"weights={w is not None} {path}\n{log.report()}"
    # a shard given its start explicitly (DeepSpeed AutoTP, Megatron)
    log = syncs_of_step(labels, vocab.shard_for(end - start, dist.group.WORLD, start),
                        NTLConfig(kind="mse"), "logits", batch, weights, start, end)
    assert len(log) == 0, log.report()
    log = syncs_of_step(labels, shard, NTLConfig(check_inputs=True), "logits", batch, weights,
                        start, end)
    assert any("ops/header.py" in s.where for s in log.syncs), log.report()


def test_no_host_sync_two_ranks():
    run_distributed(worker_two_ranks, 2, timeout=120)
