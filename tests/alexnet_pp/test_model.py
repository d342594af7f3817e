import pytest
import torch
import torch.nn as nn

from alexnet_pp.config import ConfigError, ModelConfig
from alexnet_pp.model import CROSS_TOWER, AlexNet, layer_parameter_counts
from alexnet_pp.shapes import layer_macs, layer_output_shapes

PAPER_COUNTS = {
    "conv1": 34_944,
    "conv2": 307_456,
    "conv3": 885_120,
    "conv4": 663_936,
    "conv5": 442_624,
    "fc6": 37_752_832,
    "fc7": 16_781_312,
    "fc8": 4_097_000,
}


@pytest.fixture(scope="module")
def paper_model():
    torch.manual_seed(0)
    return AlexNet(ModelConfig())


def test_paper_parameter_counts(paper_model):
    assert layer_parameter_counts(paper_model) == PAPER_COUNTS
    assert sum(p.numel() for p in paper_model.parameters()) == 60_965_224


def test_paper_macs():
    macs = layer_macs(ModelConfig())
    assert sum(macs.values()) == 724_406_816
    assert macs["conv1"] == 2 * 55 * 55 * 48 * 3 * 11 * 11


def test_paper_shape_table(paper_model):
    expected = {
        "conv1": (96, 27, 27),
        "conv2": (256, 13, 13),
        "conv3": (384, 13, 13),
        "conv4": (384, 13, 13),
        "conv5": (256, 6, 6),
        "fc6": (4096,),
        "fc7": (4096,),
        "fc8": (1000,),
    }
    paper_model.eval()
    x = torch.randn(1, 3, 224, 224)
    seen = {}
    with torch.no_grad():
        for layer in paper_model.layers():
            if layer.name == "conv1":
                # conv1 itself (before pooling) is 55×55×96 on the 227-padded image
                padded = torch.nn.functional.pad(x, (1, 2, 1, 2))
                assert padded.shape[-1] == 227
                raw = torch.cat([p(padded) for p in layer.parts], 1)
                assert raw.shape[1:] == (96, 55, 55)
            x = layer(x)
            seen[layer.name] = tuple(x.shape[1:])
    assert seen == expected
    declared = {k: v[:1] if v[1:] == (1, 1) else v for k, v in layer_output_shapes(ModelConfig()).items()}
    assert declared == expected


def test_227_input_is_used_as_is(paper_model):
    paper_model.eval()
    x224 = torch.randn(1, 3, 224, 224)
    x227 = torch.nn.functional.pad(x224, (1, 2, 1, 2))
    with torch.no_grad():
        a = paper_model(x224)
    m227 = AlexNet(ModelConfig(image_size=227))
    m227.load_state_dict(paper_model.state_dict())
    m227.eval()
    with torch.no_grad():
        b = m227(x227)
    torch.testing.assert_close(a, b)


def test_paper_init_statistics(paper_model):
    for layer in paper_model.layers():
        w = torch.cat([p.weight.flatten() for p in layer.parts])
        assert abs(w.mean().item()) < 5e-4, layer.name
        assert w.std().item() == pytest.approx(0.01, rel=0.05), layer.name
        bias = torch.cat([p.bias for p in layer.parts])
        expected = 1.0 if layer.name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
        assert torch.all(bias == expected), layer.name


def test_towers_are_explicit(paper_model):
    assert len(paper_model.towers) == 2
    t0 = paper_model.towers[0]
    assert t0.conv1.weight.shape == (48, 3, 11, 11)
    assert t0.conv2.weight.shape == (128, 48, 5, 5)  # own tower only
    assert t0.conv3.weight.shape == (192, 256, 3, 3)  # both towers
    assert t0.fc6.weight.shape == (2048, 9216)
    assert paper_model.fc8.weight.shape == (1000, 4096)
    assert set(CROSS_TOWER) == {"conv3", "fc6", "fc7", "fc8"}


def small_cfg(**kw):
    base = dict(width=0.125, image_size=64, num_classes=10)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("name", ["conv2", "conv4", "conv5", "conv3", "fc6", "fc7"])
def test_tower_isolation(name):
    torch.manual_seed(1)
    model = AlexNet(small_cfg(dropout=0.0)).eval()
    layers = model.layers()
    idx = [layer.name for layer in layers].index(name)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for layer in layers[:idx]:
            x = layer(x)
        half = x.shape[1] // 2
        perturbed = x.clone()
        perturbed[:, half:] += torch.randn_like(perturbed[:, half:])  # tower 1's activations
        y, y2 = layers[idx](x), layers[idx](perturbed)
    out_half = y.shape[1] // 2
    tower0_changed = not torch.equal(y[:, :out_half], y2[:, :out_half])
    tower1_changed = not torch.equal(y[:, out_half:], y2[:, out_half:])
    assert tower1_changed
    assert tower0_changed == (name in CROSS_TOWER)


def grouped_reference(model: AlexNet) -> nn.Module:
    """An independent AlexNet from nn.Conv2d(groups=2) and torch's LRN, weights copied from `model`."""
    cfg, w = model.cfg, model.widths
    lrn = nn.LocalResponseNorm(cfg.lrn_size, alpha=cfg.lrn_alpha * cfg.lrn_size, beta=cfg.lrn_beta, k=cfg.lrn_k)

    class PerTower(nn.Module):  # LRN normalises within a tower (the paper's GPUs did)
        def forward(self, x):
            return torch.cat([lrn(h) for h in x.chunk(2, 1)], 1)

    def norm_pool():
        pool = nn.MaxPool2d(3, 2)
        return [nn.ReLU(), PerTower(), pool] if cfg.lrn_order == "paper" else [nn.ReLU(), pool, PerTower()]

    conv1 = nn.Conv2d(3, 2 * w.conv1, 11, 4)
    conv2 = nn.Conv2d(2 * w.conv1, 2 * w.conv2, 5, padding=2, groups=2)
    conv3 = nn.Conv2d(2 * w.conv2, 2 * w.conv3, 3, padding=1)
    conv4 = nn.Conv2d(2 * w.conv3, 2 * w.conv4, 3, padding=1, groups=2)
    conv5 = nn.Conv2d(2 * w.conv4, 2 * w.conv5, 3, padding=1, groups=2)
    s = model.sizes["pool5"]
    fc6 = nn.Linear(2 * w.conv5 * s * s, 2 * w.fc)
    fc7 = nn.Linear(2 * w.fc, 2 * w.fc)
    fc8 = nn.Linear(2 * w.fc, cfg.num_classes)
    dtype = model.fc8.weight.dtype
    for layer in (conv1, conv2, conv3, conv4, conv5, fc6, fc7, fc8):
        layer.to(dtype)  # before copying: a float32 detour would round float64 weights
    with torch.no_grad():
        for name, ref in [("conv1", conv1), ("conv2", conv2), ("conv3", conv3), ("conv4", conv4),
                          ("conv5", conv5), ("fc6", fc6), ("fc7", fc7)]:
            ref.weight.copy_(torch.cat([getattr(t, name).weight for t in model.towers]))
            ref.bias.copy_(torch.cat([getattr(t, name).bias for t in model.towers]))
        fc8.load_state_dict(model.fc8.state_dict())
    pad = nn.ZeroPad2d((1, 2, 1, 2)) if cfg.image_size % 4 == 0 else nn.Identity()
    return nn.Sequential(
        pad, conv1, *norm_pool(), conv2, *norm_pool(), conv3, nn.ReLU(), conv4, nn.ReLU(), conv5, nn.ReLU(),
        nn.MaxPool2d(3, 2), nn.Flatten(), fc6, nn.ReLU(), nn.Dropout(cfg.dropout), fc7, nn.ReLU(),
        nn.Dropout(cfg.dropout), fc8,
    )


@pytest.mark.parametrize("order", ["paper", "caffenet"])
@pytest.mark.parametrize("image_size", [64, 67, 96])
def test_equals_grouped_reference(order, image_size):
    torch.manual_seed(2)
    model = AlexNet(small_cfg(lrn_order=order, image_size=image_size, width=0.25)).double()
    # Paper init makes activations tiny at this width; larger weights make the comparison meaningful.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    ref = grouped_reference(model)
    model.eval(), ref.eval()
    x = torch.randn(3, 3, image_size, image_size, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = model(x), ref(x_ref)
    assert y.abs().max() > 1e-3  # the comparison is not between two zero tensors
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
    ref_conv3 = [m for m in ref if isinstance(m, nn.Conv2d)][2]
    torch.testing.assert_close(model.towers[1].conv3.weight.grad, ref_conv3.weight.grad[-model.widths.conv3:])


def test_lrn_orders_differ():
    torch.manual_seed(3)
    a = AlexNet(small_cfg(lrn_order="paper", width=0.25)).eval()
    b = AlexNet(small_cfg(lrn_order="caffenet", width=0.25)).eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        for p in a.parameters():
            p.normal_(0, 0.05)
        b.load_state_dict(a.state_dict())
        x = torch.randn(2, 3, 64, 64)
        assert not torch.allclose(a(x), b(x))


def test_dropout_only_on_fc6_fc7_and_only_in_training():
    torch.manual_seed(4)
    model = AlexNet(small_cfg(width=0.25))
    layers = model.layers()
    x = torch.randn(4, 3, 64, 64)
    model.train()
    with torch.no_grad():
        for layer in layers:
            y1, y2 = layer(x), layer(x)
            if layer.name in ("fc6", "fc7"):
                assert not torch.equal(y1, y2), layer.name
                zero_frac = (y1 == 0).float().mean().item()
                assert 0.4 < zero_frac < 0.7  # half dropped (plus a few ReLU zeros; biases are 1)
            else:
                assert torch.equal(y1, y2), layer.name
            x = y1
    model.eval()
    with torch.no_grad():
        x = torch.randn(4, 3, 64, 64)
        assert torch.equal(model(x), model(x))


def test_dropout_scales_kept_units():
    torch.manual_seed(5)
    model = AlexNet(small_cfg(width=0.25))
    fc7 = model.layers()[6]
    x = torch.rand(8, 2 * model.widths.fc)
    with torch.no_grad():
        model.eval()
        clean = fc7(x)
        model.train()
        noisy = fc7(x)
    kept = noisy != 0
    torch.testing.assert_close(noisy[kept], 2 * clean[kept])


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(width=0.1), "whole number"),
        (dict(image_size=225), "mod 4"),
        (dict(image_size=60), "at least 64"),
        (dict(num_classes=0), "num_classes"),
    ],
)
def test_invalid_shapes_fail_at_construction(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        AlexNet(small_cfg(**kw))


def test_model_file_imports_nothing_distributed():
    import ast
    from pathlib import Path

    import alexnet_pp.model as m

    tree = ast.parse(Path(m.__file__).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    banned = ("torch.distributed", "deepspeed", "ray", "cluster")
    assert not [n for n in names if n.startswith(banned)]


def test_kaiming_init_option_for_scaled_down_presets():
    torch.manual_seed(6)
    model = AlexNet(small_cfg(init="kaiming", width=0.5))
    w = model.towers[0].conv3.weight
    assert w.std().item() == pytest.approx((2 / w[0].numel()) ** 0.5, rel=0.05)
    assert all(torch.all(p.bias == 0) for layer in model.layers() for p in layer.parts)
