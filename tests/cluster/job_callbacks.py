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


class _FromStep(Callback):
    """On the rank at (STAGE, TOWER), from step AFTER + 1 on, every pipeline layer's activations go
    through `poison` (a global forward hook, installed in that worker process only)."""

    STAGE, TOWER, AFTER = 1, 1, 2

    def __init__(self):
        self.installed = False

    def poison(self, x):
        raise NotImplementedError

    def on_step(self, stats, coord) -> None:
        if self.installed or stats.step != self.AFTER or (coord.stage, coord.tower) != (self.STAGE, self.TOWER):
            return
        import torch

        from cluster.stage_layers import StageLayer, TowerShard

        def hook(module, inputs, output):
            if isinstance(module, (StageLayer, TowerShard)) and module.training:
                return (self.poison(output[0]), *output[1:])
            return None

        torch.nn.modules.module.register_module_forward_hook(hook)
        self.installed = True


class NanOnStage1Tower1(_FromStep):
    """Stage 1, tower 1 computes NaN activations from step 3 on."""

    def poison(self, x):
        return x * float("nan")


class StuckOnStage1(_FromStep):
    """Stage 1 (tower 0) hangs in its forward pass of step 3 for 3 × parallel.collective_timeout_s."""

    TOWER = 0
    SECONDS = 30.0

    def poison(self, x):
        if not getattr(self, "slept", False):
            self.slept = True
            time.sleep(self.SECONDS)
        return x
