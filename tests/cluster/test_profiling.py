"""A few steps under torch.profiler from a callback: the window, the files, the summary."""

from types import SimpleNamespace

import pytest
import torch

from alexnet_pp.errors import ConfigError
from cluster.profiling import DIR_ENV, STEPS_ENV, StepProfiler, profile_window


def test_the_window_is_first_and_count_and_bad_text_says_what_is_expected():
    assert profile_window("10:3") == (10, 3)
    for bad in ("10", "a:b", "-1:2", "3:0"):
        with pytest.raises(ConfigError, match=STEPS_ENV):
            profile_window(bad)


def test_a_rank_writes_its_profile_of_the_steps_in_the_window(tmp_path, monkeypatch):
    monkeypatch.setenv(DIR_ENV, str(tmp_path))
    monkeypatch.setenv(STEPS_ENV, "2:2")
    cb, coord = StepProfiler(), SimpleNamespace(rank=3)
    x = torch.randn(64, 64)
    for step in range(1, 6):  # steps 3 and 4 run inside the profiler
        x = torch.tanh(x @ x.T / 64) if step in (3, 4) else x + 1
        cb.on_step(SimpleNamespace(step=step), coord)
    text = (tmp_path / "rank3.txt").read_text()
    assert "per step over 2 steps" in text and "aten::mm" in text and "aten::tanh" in text
    assert "aten::add" not in text.split("by host time")[1]  # outside the window
    assert (tmp_path / "rank3.json").stat().st_size > 0


def test_without_a_directory_the_callback_refuses_to_start(monkeypatch):
    monkeypatch.delenv(DIR_ENV, raising=False)
    with pytest.raises(ConfigError, match=DIR_ENV):
        StepProfiler()
