"""Dropout masks are a function of (seed, step, sample, layer, neuron), never of the process."""

import torch

from alexnet_pp.dropout import batch_keys, dropout, keep_mask, sample_keys


def test_the_same_image_gets_the_same_mask_wherever_it_is_computed():
    keys = batch_keys(seed=3, step=7, start=0, rows=32)
    # rows 16..31 computed on another replica or micro-batch: the same keys, the same masks
    assert torch.equal(batch_keys(seed=3, step=7, start=16, rows=16), keys[16:])
    whole = keep_mask(keys, layer=5, neuron_start=0, width=256, p=0.5)
    assert torch.equal(keep_mask(keys[16:], 5, 0, 256, 0.5), whole[16:])
    # a tower holding neurons 128..255 draws exactly that slice
    assert torch.equal(keep_mask(keys, 5, 128, 128, 0.5), whole[:, 128:])


def test_masks_change_with_seed_step_sample_and_layer():
    keys = batch_keys(seed=3, step=7, start=0, rows=64)
    base = keep_mask(keys, 5, 0, 512, 0.5)
    for other in (batch_keys(4, 7, 0, 64), batch_keys(3, 8, 0, 64), batch_keys(3, 7, 64, 64)):
        assert (keep_mask(other, 5, 0, 512, 0.5) != base).float().mean() > 0.4
    assert (keep_mask(keys, 6, 0, 512, 0.5) != base).float().mean() > 0.4
    assert len(set(sample_keys(0, 0, torch.arange(10_000)).tolist())) == 10_000  # no two samples share a key


def test_keep_rate_and_scaling_match_inverted_dropout():
    keys = batch_keys(seed=0, step=0, start=0, rows=256)
    for p in (0.1, 0.5, 0.9):
        rate = keep_mask(keys, 0, 0, 1024, p).float().mean().item()
        assert abs(rate - (1 - p)) < 0.01
    y = torch.ones(256, 1024)
    out = dropout(y, keys, 0, 0, 0.5)
    assert set(out.unique().tolist()) == {0.0, 2.0}
    # neighbouring neurons and neighbouring samples are uncorrelated
    m = keep_mask(keys, 0, 0, 1024, 0.5).float()
    assert abs((m[:, 1:] == m[:, :-1]).float().mean().item() - 0.5) < 0.01
    assert abs((m[1:] == m[:-1]).float().mean().item() - 0.5) < 0.01
