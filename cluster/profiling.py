"""A few training steps under torch.profiler on every rank: where a step's host and device time go.

    alexnet-pp train ... --callbacks cluster.profiling:StepProfiler
    ALEXNET_PP_PROFILE_DIR=DIR [ALEXNET_PP_PROFILE_STEPS=FIRST:COUNT (default 10:3)]

After step FIRST the profiler starts; after step FIRST + COUNT it stops and the rank writes
DIR/rank<R>.txt: the operators by host time and by device time, totals per step (operators, kernel
launches, device syncs), and DIR/rank<R>.json, a Chrome trace (chrome://tracing, Perfetto). A
callback, so the training loop carries no profiling code; configured by environment because
callbacks are built without arguments on every worker.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from alexnet_pp.errors import ConfigError
from cluster.callbacks import Callback

DIR_ENV, STEPS_ENV = "ALEXNET_PP_PROFILE_DIR", "ALEXNET_PP_PROFILE_STEPS"


def profile_window(text: str) -> tuple[int, int]:
    """FIRST:COUNT → (first, count); the steps profiled are first + 1 … first + count."""
    try:
        first, count = (int(v) for v in text.split(":"))
    except ValueError:
        raise ConfigError(f"{STEPS_ENV} must be FIRST:COUNT (e.g. 10:3), got {text!r}") from None
    if first < 0 or count < 1:
        raise ConfigError(f"{STEPS_ENV}: FIRST ≥ 0 and COUNT ≥ 1, got {text!r}")
    return first, count


def summary(prof: Any, steps: int, rows: int = 25) -> str:
    """Per-step totals and the top operators of a finished torch.profiler run over `steps` steps."""
    events = prof.key_averages()
    calls = {e.key: e.count for e in events}
    launches = sum(n for k, n in calls.items() if k in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel",
                                                         "cuLaunchKernelEx"))
    syncs = sum(n for k, n in calls.items() if "Synchronize" in k or k == "cudaMemcpy")
    ops = sum(n for k, n in calls.items() if k.startswith("aten::"))
    lines = [f"per step over {steps} steps: {ops / steps:.0f} aten operators, {launches / steps:.0f} kernel launches, "
             f"{syncs / steps:.1f} device synchronisations (cuda*Synchronize, blocking cudaMemcpy)", "",
             "by host time (self):", events.table(sort_by="self_cpu_time_total", row_limit=rows)]
    if torch.cuda.is_available():
        lines += ["by device time (self):", events.table(sort_by="self_device_time_total", row_limit=rows)]
    return "\n".join(lines)


class StepProfiler(Callback):
    """Profiles steps FIRST + 1 … FIRST + COUNT of this rank (see the module's docstring)."""

    def __init__(self) -> None:
        out = os.environ.get(DIR_ENV, "")
        if not out:
            raise ConfigError(f"cluster.profiling:StepProfiler needs {DIR_ENV}=<directory> on every worker")
        self.dir = Path(out)
        self.first, self.count = profile_window(os.environ.get(STEPS_ENV, "10:3"))
        self.prof: Optional[torch.profiler.profile] = None

    def on_step(self, stats: Any, coord: Any) -> None:
        if stats.step == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()
        elif stats.step == self.first + self.count and self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.dir.mkdir(parents=True, exist_ok=True)
            self.prof.export_chrome_trace(str(self.dir / f"rank{coord.rank}.json"))
            (self.dir / f"rank{coord.rank}.txt").write_text(summary(self.prof, self.count) + "\n")
            self.prof = None
