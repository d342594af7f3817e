import torch
import torch.nn as nn

from alexnet_pp.config import ModelConfig
from alexnet_pp.deferred_grads import DeferredGrads, DeferredLinear
from alexnet_pp.model import AlexNet
from alexnet_pp.steps import loss_fn


def _micro_batch_grads(model, batches, defer):
    model.zero_grad(set_to_none=True)
    deferred = DeferredGrads(model.layers()) if defer else None  # the forward runs the layer list
    for x, y in batches:
        (loss_fn(model(x), y) / len(batches)).backward()
        if defer:
            assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("towers.0.fc6"))
    if defer:
        deferred.flush()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_one_product_per_step_gives_the_accumulated_gradients():
    """Four micro-batches: the deferred weight gradients equal per-micro-batch accumulation, and the
    wrapped layers keep their parameters and names."""
    cfg = ModelConfig(width=0.25, image_size=64, num_classes=10, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 64, 64, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(4)]
    torch.manual_seed(0)
    plain = AlexNet(cfg)
    torch.manual_seed(0)
    wrapped = AlexNet(cfg)
    names = [n for n, _ in wrapped.named_parameters()]
    ref = _micro_batch_grads(plain, batches, defer=False)
    got = _micro_batch_grads(wrapped, batches, defer=True)
    assert [n for n, _ in wrapped.named_parameters()] == names
    wrapped_layers = [m for layer in wrapped.layers() for m in layer.modules() if isinstance(m, DeferredLinear)]
    assert len(wrapped_layers) == 5  # fc6, fc7 per tower, fc8
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7, msg=n)
    # a second step accumulates into nothing left over from the first
    assert all(not m.kept for m in wrapped_layers)


def test_without_grad_the_layer_keeps_nothing():
    lin = DeferredLinear(nn.Linear(8, 4))
    with torch.no_grad():
        lin(torch.randn(2, 8))
    lin(torch.randn(2, 8)).sum().backward()
    assert len(lin.kept) == 1 and lin.weight.grad is None
    lin.flush()
    assert lin.weight.grad is not None and not lin.kept
