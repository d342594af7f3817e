"""Callbacks the job tests load on every worker through `--callbacks` (cluster/callbacks.py)."""

import time

from cluster.callbacks import Callback


class SlowSteps(Callback):
    """Every rank sleeps 0.4 s after each step: a window to kill a worker or scrape a live job in."""

    def on_step(self, stats, coord) -> None:
        time.sleep(0.4)


class FailOnRank1(Callback):
    """Rank 1 raises after its first step."""

    def on_step(self, stats, coord) -> None:
        if coord.rank == 1:
            raise RuntimeError(f"failure injected by FailOnRank1 after step {stats.step}")
