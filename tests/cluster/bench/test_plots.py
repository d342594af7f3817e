"""The scaling plots' label placement (the figures themselves: tests/cluster/bench/test_scaling.py)."""

from __future__ import annotations

import pytest

from cluster.bench.plots import spread


def test_labels_of_points_close_together_move_apart_in_order_and_stay_near_their_points():
    ys = [100, 101, 102, 150, 180]
    out = spread(ys, gap=5, low=90, high=200)
    assert out == [100, 105, 110, 150, 180]
    assert all(b - a >= 5 for a, b in zip(out, out[1:]))


def test_labels_pushed_past_the_top_come_back_down_as_far_as_needed():
    out = spread([10, 96, 97, 98], gap=4, low=0, high=100)
    assert out == pytest.approx([10, 92, 96, 100])
    assert spread([], gap=1, low=0, high=1) == []
    assert spread([-5], gap=1, low=0, high=1) == [0]
