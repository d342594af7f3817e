"""The stage's gradients in one flat buffer (cluster/replica_grads.py): in place, and DeepSpeed's numbers."""

import functools

import pytest
import torch
import torch.nn as nn

from cluster.replica_grads import FlatReplicaGrads
from cluster.spawn import run_local

from .test_engine import STEPS, data_factory, layout_cfg, make_batches


def small_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    net[0].weight.data = net[0].weight.data.contiguous(memory_format=torch.channels_last)
    return net


def backward(net: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    net(x).square().sum().backward()


def test_gradients_accumulate_in_the_buffer_in_their_own_layout():
    net, plain = small_net(), small_net()
    grads = FlatReplicaGrads(list(net.parameters()), group=None, replicas=1)
    for seed in (1, 2):  # two micro-batches: autograd adds the second into the first, in place
        backward(net, seed)
        backward(plain, seed)
    grads.reduce()  # one replica: nothing to average, nothing moves
    flat = grads.flat
    for p, q in zip(net.parameters(), plain.parameters()):
        assert flat.data_ptr() <= p.grad.data_ptr() < flat.data_ptr() + flat.numel() * flat.element_size()
        assert p.grad.stride() == p.stride()
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    assert net[0].weight.grad.is_contiguous(memory_format=torch.channels_last)


def test_the_steps_end_zeroes_the_buffer_and_keeps_the_views():
    net = small_net()
    grads = FlatReplicaGrads(list(net.parameters()), group=None, replicas=1)
    backward(net, 1)
    grads.zero()
    assert not grads.flat.any()
    assert all(p.grad.data_ptr() == v.data_ptr() for p, v in zip(net.parameters(), grads.views))


def test_a_dropped_or_replaced_gradient_is_gathered_and_a_missing_one_is_zero():
    net = small_net()
    params = list(net.parameters())
    grads = FlatReplicaGrads(params, group=None, replicas=1)
    backward(net, 1)
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = p.grad.clone()  # as a pass that dropped the views and recomputed them would leave it
    params[1].grad = None
    grads.reduce()
    for i, (p, v) in enumerate(zip(params, grads.views)):
        assert p.grad.data_ptr() == v.data_ptr()
        torch.testing.assert_close(p.grad, torch.zeros_like(p) if i == 1 else expected[i], rtol=0, atol=0)


def test_parameters_of_two_dtypes_are_refused():
    with pytest.raises(ValueError, match="one dtype"):
        FlatReplicaGrads([nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, dtype=torch.float64))], None, 1)


def counted(batches, tp, dp, m, marks, rank):
    """In the rank's process: each reduce of the flat buffer leaves a mark (which path ran)."""
    from cluster.replica_grads import FlatReplicaGrads

    reduce = FlatReplicaGrads.reduce

    def marked(self, bucket_size=None):
        with open(marks / f"rank{rank}", "a") as f:
            f.write(f"{self.replicas}\n")
        reduce(self, bucket_size)

    FlatReplicaGrads.reduce = marked
    return data_factory(batches, tp, dp, m, rank)


@pytest.mark.e2e
def test_the_engine_gives_deepspeeds_own_reduce_bit_for_bit(tmp_path):
    """Two replicas add two numbers, in either order the same: the losses and weights after every
    step are those of DeepSpeed's reduce (parallel.flat_grads = false) exactly. Dropout on, clipping
    on; the deferred FC weight gradients add into the buffer where DeepSpeed copies a new tensor."""
    pp, tp, dp, m = 2, 1, 2, 2
    cfg = layout_cfg(tmp_path, pp, tp, dp, m, **{"checkpoint.resume": "false", "train.grad_clip": "0.05",
                                              "parallel.defer_weight_grads": "true",
                                              "parallel.partition": "uniform"})  # a timed cut may differ between runs
    assert cfg.model.dropout == 0.5
    batches = make_batches(STEPS, cfg.train.batch_size)
    marks = tmp_path / "marks"
    marks.mkdir()
    ours = run_local(cfg, functools.partial(counted, batches, tp, dp, m, marks), keep_parameters=True)
    assert sorted(p.name for p in marks.iterdir()) == [f"rank{r}" for r in range(pp * tp * dp)]
    assert all(p.read_text().split() == [str(dp)] * STEPS for p in marks.iterdir())  # every step, every rank
    cfg.parallel.flat_grads = False
    theirs = run_local(cfg, functools.partial(counted, batches, tp, dp, m, marks), keep_parameters=True)
    assert all(len(p.read_text().split()) == STEPS for p in marks.iterdir())  # DeepSpeed's reduce: no new mark
    for a, b in zip(ours, theirs):
        assert a.losses == b.losses
        assert set(a.parameters) == set(b.parameters)
        for key in a.parameters:
            torch.testing.assert_close(a.parameters[key], b.parameters[key], rtol=0, atol=0, msg=key)
