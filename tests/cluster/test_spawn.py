"""Local ranks (cluster.spawn.start_ranks): forked from a server that has imported torch, each with
the environment its caller has when it starts them, a rank's failure raised in the caller."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from cluster.spawn import start_ranks


def _write_environment(rank: int, out: str) -> None:
    Path(out, f"rank{rank}").write_text(f"{os.environ.get('ALEXNET_PP_PROBE')} {'torch' in sys.modules}")


def _fail_on_rank_1(rank: int) -> None:
    if rank == 1:
        raise ValueError("rank 1 refuses")


def test_ranks_see_the_callers_environment_of_the_moment_and_torch_already_imported(tmp_path, monkeypatch):
    monkeypatch.setenv("ALEXNET_PP_PROBE", "first")
    start_ranks(_write_environment, (str(tmp_path),), 2, join=True)  # starts the fork server, if not yet
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["first True"] * 2
    monkeypatch.setenv("ALEXNET_PP_PROBE", "second")  # the fork server keeps the environment it started with
    start_ranks(_write_environment, (str(tmp_path),), 1, join=True)
    assert (tmp_path / "rank0").read_text() == "second True"


def test_a_ranks_exception_is_raised_in_the_caller():
    with pytest.raises(Exception, match="rank 1 refuses"):
        start_ranks(_fail_on_rank_1, (), 2, join=True)
