import torch

from alexnet_pp.config import ModelConfig
from alexnet_pp.model import AlexNet
from cluster.stage_layers import GroupRef, TowerShard, eval_stats


def test_tower_dropout_masks_are_independent_slices_of_one_full_width_mask():
    model = AlexNet(ModelConfig(width=0.25, image_size=64, num_classes=10))
    fc6 = model.layers()[5]
    shards = [TowerShard(fc6, t, GroupRef(), first=False, dropout_seed=7) for t in (0, 1)]
    y = torch.ones(64, model.widths.fc)
    halves = [s._dropout(y) for s in shards]
    full = torch.empty(64, 2 * model.widths.fc).bernoulli_(0.5, generator=torch.Generator().manual_seed(7)) * 2
    torch.testing.assert_close(torch.cat(halves, 1), full)
    assert not torch.equal(halves[0], halves[1])  # the towers' neurons are not dropped in lockstep
    assert 0.4 < (halves[0] == 0).float().mean() < 0.6
    again = TowerShard(fc6, 0, GroupRef(), first=False, dropout_seed=7)._dropout(y)
    torch.testing.assert_close(again, halves[0])  # reproducible from the seed


def test_eval_stats_average_crops_and_ignore_padding():
    labels = torch.tensor([0, 1, -1])
    logits = torch.full((3 * 2, 3), -5.0)
    logits[0, 0] = logits[1, 0] = 5.0  # sample 0: both crops say class 0 (right)
    logits[2, 2] = 5.0  # sample 1: crop 1 says 2 (wrong) ...
    logits[3, 1] = 9.0  # ... crop 2 says 1 strongly: the average picks 1 (right)
    loss, h1, h5, n = eval_stats((logits, labels), None).tolist()
    assert (h1, h5, n) == (2, 2, 2)
    assert loss > 0
