"""Self-tests of tests/op_counter.py: every counted pattern is counted once, clean code is 0."""

import pytest
import torch
import torch.nn.functional as F

from op_counter import SYNC_METHODS, count_dispatched_ops, count_host_syncs

x = torch.arange(6.0)
mask = x > 2


@pytest.mark.parametrize("name, fn", [
    ("item", lambda: x.sum().item()),
    ("bool", lambda: bool(x.any())),
    ("if", lambda: 1 if (x > 0).all() else 0),
    ("float", lambda: float(x.sum())),
    ("int", lambda: int(x.sum())),
    ("index", lambda: [0, 1, 2][torch.tensor(1)]),
    ("tolist", lambda: x.tolist()),
    ("mask_index", lambda: x[mask]),
    ("mask_assign", lambda: x.clone().__setitem__(mask, 0.0)),
    ("nonzero", lambda: torch.nonzero(mask)),
    ("where_1arg", lambda: torch.where(mask)),
    ("masked_select", lambda: x.masked_select(mask)),
    ("unique", lambda: torch.unique(x)),
    ("repeat_interleave", lambda: torch.repeat_interleave(x, torch.ones(6, dtype=torch.long))),
])
def test_each_pattern_counted_once(name, fn):
    _, count, details = count_host_syncs(fn)
    assert count == 1, details
    assert __file__ in details[0]  # points at the caller, not at torch internals


@pytest.mark.parametrize("fn", [
    lambda: torch.repeat_interleave(x, torch.ones(6, dtype=torch.long), output_size=6),
    lambda: torch.where(mask, x, 0.0),
    lambda: x[torch.tensor([0, 2])],  # integer index: no sync
    lambda: x.clone().index_put_((torch.tensor([1]),), torch.tensor(9.0)),
    lambda: torch.nonzero_static(mask, size=6),
])
def test_sync_free_patterns(fn):
    assert count_host_syncs(fn)[1] == 0


def test_cross_entropy_forward_backward_has_no_sync():
    logits = torch.randn(7, 11, requires_grad=True)
    labels = torch.tensor([0, 3, -100, 10, 2, 2, 5])

    def step():
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        return loss

    loss, count, details = count_host_syncs(step)
    assert count == 0, details
    assert logits.grad is not None and torch.isfinite(loss)


def test_backward_is_counted():
    class SyncInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return a * 2

        @staticmethod
        def backward(ctx, g):
            g.sum().item()
            return g * 2

    a = torch.ones(3, requires_grad=True)
    _, count, details = count_host_syncs(lambda: SyncInBackward.apply(a).sum().backward())
    assert count == 1 and "Tensor.item" in details[0], details


def test_methods_restored_after_exception():
    before = {n: getattr(torch.Tensor, n) for n in SYNC_METHODS}
    with pytest.raises(RuntimeError):
        count_host_syncs(lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert {n: getattr(torch.Tensor, n) for n in SYNC_METHODS} == before
    assert all(n not in torch.Tensor.__dict__ for n in SYNC_METHODS)


def test_count_dispatched_ops():
    _, count, ops = count_dispatched_ops(lambda: torch.add(x, 1).mul_(2))
    assert count == 2 and ops == {"aten.add.Tensor": 1, "aten.mul_.Tensor": 1}
