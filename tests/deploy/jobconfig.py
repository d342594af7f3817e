"""The one place tests/deploy turns the words after `python -m cluster.job` into a checked run config
(the project's own argument parsing and layout validation), so a change of that API is made here once.

    cfg, layout = job_config(["--preset", "paper", "--parallel.pp", "2"])   # raises on a bad layout
"""

from __future__ import annotations

from typing import Sequence

ENTRY = ["python", "-m", "cluster.job"]


def job_config(args: Sequence[str]):
    """The RunConfig and Layout `python -m cluster.job ARGS` runs (a bad layout raises here)."""
    from cluster.job import resolve

    return resolve(list(args))


def entrypoint_config(words: Sequence[str]):
    """A whole entrypoint, `python -m cluster.job ARGS`, as its words."""
    assert list(words[:3]) == ENTRY, words[:3]
    return job_config(words[3:])
