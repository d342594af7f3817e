"""Per-step stats: the idle phase, the bubble and the rank's peak memory."""

import pytest

from cluster.timing import peak_memory_bytes, step_stats


def test_step_stats_fill_idle_bubble_and_peak_memory():
    s = step_stats(3, 0, 1.0, 0.01, 64, 2.0, {"forward": 0.5, "backward": 0.7, "optimizer": 0.4}, 0.2)
    assert s.phases["idle"] == pytest.approx(0.4) and s.bubble == pytest.approx(0.25)
    assert s.peak_memory >= 10 * 2**20  # a Python process with torch loaded holds well over 10 MiB
    assert s.peak_memory <= peak_memory_bytes()  # a peak only grows
    assert step_stats(1, 0, 1.0, 0.01, 64, 1.0, {}, 0.0, peak_memory=5).peak_memory == 5
