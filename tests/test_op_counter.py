"""Self-tests of tests/op_counter.py's call interface (the sync patterns themselves are tested
with the implementation, in test_host_syncs.py): backward is counted, F.cross_entropy is sync
free, dispatched ops are counted."""

import torch
import torch.nn.functional as F

from op_counter import count_dispatched_ops, count_host_syncs

x = torch.arange(6.0)


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


def test_count_dispatched_ops():
    _, count, ops = count_dispatched_ops(lambda: torch.add(x, 1).mul_(2))
    assert count == 2 and ops == {"aten.add.Tensor": 1, "aten.mul_.Tensor": 1}
