"""Runs that go wrong stop early and say why, on every rank at once (docs/ARCHITECTURE.md, "Faults").

- `StopRun`: raised on every rank together when the job must end without a restart, because a
  restart would meet the same fault (a non-finite loss, a full disk). The engine ends its loop, the
  worker group finishes normally (Ray Train does not retry it) and the driver reports the message as
  the job's error.
- `NonFiniteWatch`: forward hooks on a rank's pipeline layers. After a non-finite loss — which every
  rank sees, since DeepSpeed broadcasts the step's loss — `stop()` (a collective) names the step and the
  first stage, tower and layer whose output was not finite. Nothing is saved after it: the newest
  complete checkpoint is the last good one.
- `InstructionWatchdog`: a thread per rank that reports (through `Callback.on_stuck`) the pipeline
  instruction the rank has been in for longer than half of `parallel.collective_timeout_s`, so a stage
  stuck in its own computation is named even though only its peers' collectives time out;
  `where(timer)` names the instruction an exception came from.
- `CheckpointWriteGuard`: checkpoint writes that fail (a full disk) are recorded instead of raised;
  every rank compares notes before the completion marker is written (cluster/checkpoint.py) and all
  raise `CheckpointWriteFailed` together, after rank 0 removed the partial directory. The completion marker is never written, so the previous
  complete checkpoint stays the newest and usable.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist

from alexnet_pp.fileio import write_atomic
from cluster.callbacks import Callback

log = logging.getLogger(__name__)

# instructions that compute on the rank itself; the others wait for a peer
COMPUTE_INSTRUCTIONS = ("ForwardPass", "BackwardPass", "LoadMicroBatch", "OptimizerStep", "ReduceGrads",
                        "ReduceTiedGrads")


class StopRun(RuntimeError):
    """Stop the job on every rank without a restart; the message is the job's error."""


class NonFiniteLoss(StopRun):
    pass


class CheckpointWriteFailed(StopRun):
    pass


def _newest_checkpoint_text(checkpoints: Any) -> str:
    try:
        latest = checkpoints.store.latest()
    except Exception:  # the store is unreadable too: say so rather than fail the report
        return "the newest complete checkpoint could not be read"
    if latest is None:
        return "no checkpoint was complete yet"
    step, tag, _ = latest
    return f"the newest complete checkpoint is step {step} ({checkpoints.store.root / tag}), intact"


# --- non-finite loss ------------------------------------------------------------------------------


def layer_name(layer: Any) -> str:
    for obj in (layer, getattr(layer, "layer", None)):
        name = getattr(obj, "name", None)
        if isinstance(name, str):
            return name
    return type(layer).__name__


def _tensors(x: Any) -> Iterable[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for item in x:
            yield from _tensors(item)


class NonFiniteWatch:
    """Forward hooks that let a rank tell, after a non-finite loss, which of its layers first gave a
    non-finite output during the step. A hook launches one reduction, the output's float32 sum: it is
    non-finite exactly when the output holds a NaN or an infinity (or finite values summing past
    float32's ~3e38, a layer as far gone). Nothing synchronises; the sums are read only after a
    non-finite loss. (Flags set by indexing a device tensor cost six operators a layer: about 2 ms of
    host time in a 13 ms step of the paper network on an H200, while the device waited.)"""

    def __init__(self, layers: Iterable[Any], coord: Any, device: Any = "cpu"):
        self.layers = [layer for layer in layers if isinstance(layer, torch.nn.Module)]
        self.names = [layer_name(layer) for layer in self.layers]
        self.coord = coord
        self.sums: list[tuple[int, torch.Tensor]] = []  # (layer index, output sum) in the order run
        self.handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]

    def _hook(self, i: int) -> Callable:
        def hook(module, inputs, output) -> None:
            for t in _tensors(output):
                if t.is_floating_point():
                    self.sums.append((i, t.detach().sum(dtype=torch.float32)))

        return hook

    def reset(self) -> None:
        self.sums.clear()

    def first_bad_layer(self) -> Optional[int]:
        """The index (in this stage) of the first layer whose output was not finite this step."""
        if not self.sums:
            return None
        finite = torch.isfinite(torch.stack([s for _, s in self.sums])).tolist()
        bad = [i for (i, _), ok in zip(self.sums, finite) if not ok]
        return min(bad) if bad else None

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def stop(self, step: int, loss: float, checkpoints: Any, last_stage: int) -> NonFiniteLoss:
        """A collective (every rank saw the same loss): the error every rank raises."""
        c, first = self.coord, self.first_bad_layer()
        mine = {"rank": c.rank, "stage": c.stage, "tower": c.tower, "replica": c.replica, "index": first,
                "layer": None if first is None else self.names[first]}
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        return NonFiniteLoss(f"non-finite training loss ({loss}) at step {step}: "
                             f"{origin_of_non_finite(everyone, last_stage)}. The job stopped without saving "
                             f"this step; {_newest_checkpoint_text(checkpoints)}. Lower train.lr or set "
                             "train.grad_clip, then resume from it with the same command")


def origin_of_non_finite(records: list[dict[str, Any]], last_stage: int) -> str:
    """Where non-finite values appeared first: the lowest stage with a non-finite layer output, and
    in it the earliest layer (a tower's NaN reaches the other tower only at a cross-tower layer)."""
    hits = [r for r in records if r.get("layer")]
    if not hits:
        return (f"every layer's output was finite, so the loss itself overflowed "
                f"(computed on stage {last_stage})")
    stage = min(r["stage"] for r in hits)
    index = min(r["index"] for r in hits if r["stage"] == stage)
    first = sorted((r for r in hits if r["stage"] == stage and r["index"] == index),
                   key=lambda r: (r["tower"], r["replica"]))
    towers = sorted({r["tower"] for r in first})
    replicas = sorted({r["replica"] for r in first})
    where = f"tower {towers[0]}" if len(towers) == 1 else "towers " + " and ".join(map(str, towers))
    return (f"the first non-finite output came from stage {stage}, {where} (layer {first[0]['layer']}, "
            f"replica{'s' if len(replicas) > 1 else ''} {', '.join(map(str, replicas))})")


# --- stuck instructions ---------------------------------------------------------------------------


def where(timer: Any) -> str:
    """'in pipeline instruction RecvGrad(buffer_id=1) of step 4' for the instruction that raised."""
    f = getattr(timer, "failed_in", None) or getattr(timer, "in_flight", None)
    return f"in {f.describe()}" if f is not None else ""


def timed_out(text: str) -> bool:
    t = text.lower()
    return "timed out" in t or "timeout" in t


class InstructionWatchdog:
    """Reports the instruction this rank has been in for longer than half of the collective timeout
    (the peers' collectives give up at the full timeout, so the report is out before the job stops);
    the report is refreshed every poll and withdrawn (record None) when the instruction ends."""

    def __init__(self, timer: Any, coord: Any, timeout_s: float, report: Callable[[Optional[dict]], None]):
        self.timer, self.coord, self.timeout_s, self.report = timer, coord, timeout_s, report
        self.threshold = timeout_s / 2
        self.poll_s = max(0.05, min(1.0, self.threshold / 4))
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._reported: Any = None

    def start(self) -> "InstructionWatchdog":
        self._thread = threading.Thread(target=self._loop, name="instruction-watchdog", daemon=True)
        self._thread.start()
        return self

    def check(self) -> None:
        f = self.timer.in_flight
        now = time.monotonic()
        if f is not None and now - f.started >= self.threshold:
            c = self.coord
            record = {"rank": c.rank, "stage": c.stage, "tower": c.tower, "replica": c.replica,
                      "instruction": f.name, "where": f.describe(), "step": f.step,
                      "seconds": round(now - f.started, 2), "timeout_s": self.timeout_s, "time": time.time()}
            if self._reported is not f:
                log.error("%s has been in %s for %.1f s (parallel.collective_timeout_s = %g s)",
                          c.label(), f.describe(), now - f.started, self.timeout_s)
            self._reported = f
            self.report(record)
        elif self._reported is not None and f is not self._reported:
            self._reported = None
            self.report(None)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except Exception as e:  # a report that cannot be written must not kill the rank
                log.warning("instruction watchdog: %s", e)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def stuck_path(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) / "workers" / f"rank{rank}.stuck.json"


class StuckReport(Callback):
    """Writes a rank's watchdog reports to run_dir/workers/rank{r}.stuck.json for the driver."""

    def __init__(self, run_dir: str | Path, job_id: str, attempt: int, rank: int):
        self.path, self.job_id, self.attempt = stuck_path(run_dir, rank), job_id, attempt
        self.path.unlink(missing_ok=True)  # an earlier attempt's

    def on_stuck(self, record: Optional[dict], coord: Any) -> None:
        if record is None:
            self.path.unlink(missing_ok=True)
        else:
            write_atomic(self.path, json.dumps({"job": self.job_id, "attempt": self.attempt, **record}))


def stuck_reports(run_dir: str | Path, job_id: str) -> list[str]:
    """The driver's lines for the ranks of the job's newest attempt that were stuck in an instruction,
    those computing on their own first (the ones waiting for them come after)."""
    records = []
    for p in sorted((Path(run_dir) / "workers").glob("rank*.stuck.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if rec.get("job") == job_id:
            records.append(rec)
    if not records:
        return []
    newest = max(r.get("attempt", 0) for r in records)
    records = [r for r in records if r.get("attempt", 0) == newest]
    records.sort(key=lambda r: (r["instruction"] not in COMPUTE_INSTRUCTIONS, r["rank"]))
    return [f"rank {r['rank']} (stage {r['stage']}, tower {r['tower']}, replica {r['replica']}) was stuck in "
            f"{r['where']} for {r['seconds']:.1f} s (parallel.collective_timeout_s = {r['timeout_s']:g} s)"
            + ("" if r["instruction"] in COMPUTE_INSTRUCTIONS else ", waiting for a peer")
            for r in records]


# --- checkpoint writes ----------------------------------------------------------------------------


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


class CheckpointWriteGuard:
    """Passed to `EngineCheckpoints.save`: a rank whose write fails (a full disk) records the error
    instead of raising alone, and `agree()` — a collective every rank calls, once after the parts and
    once after rank 0's completion marker — makes every rank raise `CheckpointWriteFailed` together,
    after rank 0 removed the partial directory. The marker is never written for a failed save, so
    the previous complete checkpoint stays the newest and usable."""

    def __init__(self, checkpoints: Any, step: int, coord: Any):
        from cluster.checkpoint import tag_for

        self.checkpoints, self.step, self.coord = checkpoints, step, coord
        self.tag_dir = Path(checkpoints.store.root) / tag_for(step)
        self.error: Optional[str] = None

    def failed(self, error: BaseException, path: Any) -> None:
        target = Path(path) if path else self.tag_dir
        try:
            left = shutil.disk_usage(_existing(target)).free
            free = f"; {left} bytes were left on its file system" + (": it is full" if left == 0 else "")
        except OSError:
            free = ""
        if path:
            try:  # a partial file only takes the space the next write needs
                Path(path).unlink(missing_ok=True)
            except OSError:
                pass
        if self.error is None:
            self.error = (f"{type(error).__name__}: {error}".strip() +
                          (f" writing {path}" if path and str(path) not in str(error) else "") + free)
        log.error("%s: checkpoint write failed: %s", self.coord.label(), self.error)

    def agree(self) -> None:
        """A collective: every rank learns whether any rank's write failed; if so all raise together."""
        flag = torch.tensor([0 if self.error is None else 1], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not int(flag.item()):
            return
        c = self.coord
        errors: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, (c.label(), self.error))
        if dist.get_rank() == 0:
            shutil.rmtree(self.tag_dir, ignore_errors=True)
        failed = [f"{label}: {err}" for label, err in errors if err]
        raise CheckpointWriteFailed(
            f"the checkpoint of step {self.step} could not be written to {self.tag_dir.parent}: "
            + "; ".join(failed[:4]) + (f" (and {len(failed) - 4} more ranks)" if len(failed) > 4 else "")
            + f". The job stopped; the partial checkpoint was removed and {_newest_checkpoint_text(self.checkpoints)}. "
            "Free space there or set checkpoint.dir elsewhere (copy the checkpoints along), then resume "
            "with the same command")

