import torch

from alexnet_pp.config import ModelConfig
from alexnet_pp.dropout import batch_keys
from alexnet_pp.model import AlexNet
from alexnet_pp.pipeline import Partition
from cluster.stage_layers import GroupRef, TowerShard, eval_stats, rank_layers


def test_a_tower_shard_holds_only_its_towers_part_with_the_single_networks_weights():
    cfg = ModelConfig(width=0.25, image_size=64, num_classes=10)
    model = AlexNet(cfg, seed=5)
    for tower in (0, 1):
        shard = TowerShard(cfg, "fc6", tower, GroupRef(), seed=5, first=False)
        assert sum(p.numel() for p in shard.parameters()) == sum(p.numel() for p in model.towers[tower].fc6.parameters())
        assert torch.equal(shard.part.weight, model.towers[tower].fc6.weight)
        assert [k for k, _ in shard.model_parameters()] == [f"towers.{tower}.fc6.weight", f"towers.{tower}.fc6.bias"]
    fc8 = TowerShard(cfg, "fc8", 1, GroupRef(), seed=5, first=False)
    assert fc8.replicated and torch.equal(fc8.part.weight, model.fc8.weight)


def test_tower_shards_draw_the_dropout_masks_of_the_single_network():
    """An own-tower layer needs no collective: each shard's output is its slice of the whole layer's,
    dropout included (the masks come from the rows' keys and the tower's neuron offset)."""
    cfg = ModelConfig(width=0.25, image_size=64, num_classes=10, dropout=0.5)
    model = AlexNet(cfg, seed=2).train()
    conv4 = model.layers()[3]
    x = torch.randn(4, 2 * model.widths.conv3, 13, 13)
    keys = batch_keys(seed=9, step=3, start=8, rows=4)
    whole = conv4(x, keys)
    fc7_ops = model.layers()[6].ops
    h = torch.randn(4, 2 * model.widths.fc)
    for tower in (0, 1):
        shard = TowerShard(cfg, "conv4", tower, GroupRef(), seed=2, first=False).train()
        mine = x.chunk(2, dim=1)[tower]
        y, _, _ = shard((mine, torch.zeros(4, dtype=torch.long), keys))
        torch.testing.assert_close(y, whole.chunk(2, dim=1)[tower], rtol=0, atol=0)
        part = model.towers[tower].fc7
        dropped = fc7_ops.forward(part, tower, h, keys, training=True)
        full = model.layers()[6](h, keys)
        assert torch.equal(dropped, full.chunk(2, dim=1)[tower])
    assert 0.3 < (full == 0).float().mean() < 0.7


def test_rank_layers_are_specs_that_build_only_when_asked():
    from deepspeed.pipe import LayerSpec

    cfg = ModelConfig(width=0.25, image_size=64, num_classes=10)
    specs, bounds = rank_layers(cfg, 1, 0, GroupRef(), 0, Partition((0, 3, 12), "given"))
    assert all(isinstance(s, LayerSpec) for s in specs) and bounds == (0, 3, 9)
    # a cut 10 channels into conv3.1: stage 0 ends with that piece, stage 1 starts with the rest
    specs, bounds = rank_layers(cfg, 1, 0, GroupRef(), 0, Partition((0, 3, 12), "given", (10,)))
    assert bounds == (0, 4, 10)
    pieces = [specs[3].build().layer, specs[4].build().layer]
    assert [p.part.out_channels for p in pieces] == [10, 38]
    assert [k for p in pieces for k, _ in p.model_parameters()][::2] == ["towers.1.conv3[0:10].weight",
                                                                         "towers.1.conv3[10:48].weight"]
    specs2, _ = rank_layers(cfg, 2, 1, GroupRef(), 0, Partition((0, 4, 8), "given"))
    assert len(specs2) == 8
    built = specs2[5].build()
    assert isinstance(built, TowerShard) and built.tower == 1 and built.name == "fc6"


def test_channels_last_stages_convolve_in_nhwc_and_hand_on_contiguous_tensors():
    """parallel.channels_last: every convolution of a stage runs channels-last (its output is), a stage's
    output leaves contiguous (what the sends take), and the network computes what NCHW computes."""
    cfg = ModelConfig(width=0.25, image_size=64, num_classes=10, dropout=0.5)
    # stage 1 starts 20 channels into tower 1's half of conv4: a split layer's hand-off crosses it
    cut = Partition((0, 5, 12), "given", (20,))
    x = torch.randn(4, 3, 64, 64)
    labels = torch.zeros(4, dtype=torch.long)
    keys = batch_keys(seed=1, step=0, start=0, rows=4)
    outputs = {}
    for channels_last in (False, True):
        specs, stage_bounds = rank_layers(cfg, 1, 0, GroupRef(), 3, cut, channels_last)
        layers = [spec.build().train() for spec in specs]
        seen = []
        for layer in layers:
            for conv in layer.modules():
                if isinstance(conv, torch.nn.Conv2d):
                    conv.register_forward_hook(lambda m, args, out: seen.append(
                        out.is_contiguous(memory_format=torch.channels_last)))
        h = (x, labels, keys)
        for i, layer in enumerate(layers):
            h = layer(h)
            if i + 1 == stage_bounds[1]:  # what stage 0 sends
                assert h[0].is_contiguous()
        outputs[channels_last] = h[0]
        assert seen and all(seen) == channels_last and any(seen) == channels_last
    torch.testing.assert_close(outputs[True], outputs[False], rtol=1e-4, atol=1e-5)


def test_eval_stats_average_crops_and_ignore_padding():
    labels = torch.tensor([0, 1, -1])
    logits = torch.full((3 * 2, 3), -5.0)
    logits[0, 0] = logits[1, 0] = 5.0  # sample 0: both crops say class 0 (right)
    logits[2, 2] = 5.0  # sample 1: crop 1 says 2 (wrong) ...
    logits[3, 1] = 9.0  # ... crop 2 says 1 strongly: the average picks 1 (right)
    loss, h1, h5, n = eval_stats((logits, labels, torch.zeros(2, dtype=torch.long)), None).tolist()
    assert (h1, h5, n) == (2, 2, 2)
    assert loss > 0


def test_the_evaluation_sample_count_survives_deepspeeds_averaging_exactly():
    from cluster.engine import eval_metrics, eval_totals

    for count, parts in ((777, 11), (50_000, 3), (30, 2)):
        averaged = torch.tensor([1.0, count / 2, count, count], dtype=torch.float32) / parts  # as eval_batch leaves it
        assert eval_metrics(eval_totals(averaged, parts))["val_samples"] == count
