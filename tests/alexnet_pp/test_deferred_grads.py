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


def _whole_network_grads(model, batches, deferred=None):
    """Per-micro-batch backward; with `deferred`, B only under each micro-batch's key and then W per
    micro-batch in order, as the zero-bubble schedule runs them."""
    model.zero_grad(set_to_none=True)
    for m, (x, y) in enumerate(batches):
        if deferred is None:
            (loss_fn(model(x), y) / len(batches)).backward()
            continue
        with deferred.recording(m):
            (loss_fn(model(x), y) / len(batches)).backward()
        assert all(p.grad is None for p in model.parameters())  # B computed no weight gradient
    if deferred is not None:
        assert deferred.pending() == set(range(len(batches)))
        for m in range(len(batches)):
            deferred.flush(m)
        assert not deferred.pending()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_per_micro_batch_weight_passes_of_every_conv_and_linear_give_the_accumulated_gradients():
    from alexnet_pp.deferred_grads import DeferredConv2d

    cfg = ModelConfig(width=0.25, image_size=64, num_classes=10, dropout=0.0)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 64, 64, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(3)]
    plain, wrapped = AlexNet(cfg, seed=3), AlexNet(cfg, seed=3)
    names = [n for n, _ in wrapped.named_parameters()]
    deferred = DeferredGrads(wrapped.layers(), convolutions=True)
    assert [n for n, _ in wrapped.named_parameters()] == names
    assert sum(isinstance(m, DeferredConv2d) for m in deferred.layers) == 10  # conv1..conv5 per tower
    assert len(deferred.layers) == 15
    ref = _whole_network_grads(plain, batches)
    got = _whole_network_grads(wrapped, batches, deferred)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7, msg=n)


def test_a_conv_weight_pass_matches_autograd_with_stride_and_padding():
    from alexnet_pp.deferred_grads import DeferredConv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 11, stride=4, padding=2)
    wrapped = DeferredConv2d(nn.Conv2d(3, 5, 11, stride=4, padding=2))
    wrapped.weight.data.copy_(conv.weight.data)
    wrapped.bias.data.copy_(conv.bias.data)
    x = torch.randn(2, 3, 67, 67)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    conv(xa).square().sum().backward()
    wrapped(xb).square().sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad)  # B: the input gradient, in the backward pass
    assert wrapped.weight.grad is None and wrapped.bias.grad is None
    wrapped.flush()
    torch.testing.assert_close(wrapped.weight.grad, conv.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wrapped.bias.grad, conv.bias.grad, rtol=1e-5, atol=1e-5)


def test_a_weight_pass_adds_plain_tensors_into_gradients_it_did_not_make():
    """W runs where grad mode is on (a pipeline instruction, not autograd's backward): the gradients
    it adds carry no graph, so adding twice into a .grad that is a view of a flat buffer works."""
    from alexnet_pp.deferred_grads import DeferredConv2d

    torch.manual_seed(0)
    wrapped = DeferredConv2d(nn.Conv2d(3, 4, 3))
    flat = torch.zeros(sum(p.numel() for p in wrapped.parameters()))
    wrapped.weight.grad = flat[:wrapped.weight.numel()].view_as(wrapped.weight)
    wrapped.bias.grad = flat[wrapped.weight.numel():]
    for _ in range(2):
        wrapped(torch.randn(2, 3, 8, 8, requires_grad=True)).sum().backward()
        assert torch.is_grad_enabled()
        wrapped.flush()
    assert not flat.requires_grad and flat.grad_fn is None and flat.abs().sum() > 0
    assert wrapped.weight.grad.data_ptr() == flat.data_ptr()


def test_a_conv_weight_pass_over_channels_last_inputs_gives_the_gradient_in_the_weights_layout():
    """Over NHWC activations torch's convolution backward returns an NHWC weight gradient; the W pass
    hands it over in the weight's own layout, as autograd does (DeepSpeed reads flat views of it)."""
    from alexnet_pp.deferred_grads import DeferredConv2d

    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    wrapped = DeferredConv2d(nn.Conv2d(4, 6, 3, padding=1))
    wrapped.weight.data.copy_(conv.weight.data)
    wrapped.bias.data.copy_(conv.bias.data)
    x = torch.randn(2, 4, 9, 9).contiguous(memory_format=torch.channels_last)
    conv(x).square().sum().backward()
    wrapped(x).square().sum().backward()
    wrapped.flush()
    assert wrapped.weight.grad.stride() == wrapped.weight.stride() == conv.weight.grad.stride()
    torch.testing.assert_close(wrapped.weight.grad.flatten(), conv.weight.grad.flatten(), rtol=1e-5, atol=1e-5)


def test_discard_forgets_kept_rows():
    deferred = DeferredGrads([nn.Sequential(nn.Linear(8, 4))])
    x = torch.randn(2, 8)
    deferred.layers[0](x).sum().backward()
    assert deferred.pending() == {None}
    deferred.discard()
    deferred.flush()
    assert not deferred.pending() and deferred.layers[0].weight.grad is None
