"""`alexnet-pp bench scaling`: every layout (P, T, D, M) of 1…N workers, measured through the
training job path beside the baselines and the cost model's prediction, on the same hardware.

    alexnet-pp bench scaling [--workers 1,2,4] [--preset demo] [--micro-batches 4] [--data tensors|shards]
                             [--launcher ray|spawn] [--steps 10] [--warmup 2] [--repeats 1] [--out DIR]

For each worker count W, in one run:

1. calibration: this machine's device profile (alexnet_pp.planning.profile.measure_profile), with
   the run's other workers (as many as the cores hold beside the timed one) training the network
   meanwhile when the W workers share a CPU (on GPUs none); the links between two processes are
   measured once a round. `--calibrate layout` (the default) calibrates right before and right
   after each layout's run, at its micro-batch; `--calibrate worker-count`: once per worker count,
   at the micro-batch sizes its layouts use. A layout is predicted with the unit, optimizer and
   gradient-sweep times pooled over every calibration of the sweep at its micro-batch (the same
   threads and co-runners; profile.pooled_profile) and the links' medians over the rounds: on a
   shared machine one calibration's unit times swing by ±25% from the next (8-image micro-batches:
   5.9 to 10.0 ms an image within one sweep here), more than the machine drifts over a sweep, so
   the mean of many predicts each run better than the two taken right beside it, and one link
   measured while the machine is busy can be ten times off;
2. baselines: the plain single-process trainer with min(W × threads, cores) torch threads, and
   PyTorch DistributedDataParallel of the same network over W processes (W ≥ 2; data parallel
   only), both on the same in-memory batches (cluster/bench/baselines.py);
3. every layout with P·T·D = W (M from --micro-batches where P > 1, else 1; or --layouts), warm-up
   steps then timed steps, through `cluster.driver.run_job` — the Ray job path training takes
   (`--launcher spawn`: the same ranks as local processes, cluster.spawn.run_local, without Ray's
   start-up) — and, for P > 1, the same layout cut by DeepSpeed's own default (`parameters`).

Each row: images/s; efficiency against one worker; step time p50 / p95; each stage's phase seconds
per step (forward, backward, send, recv, idle, data_wait, optimizer); the bubble per stage measured,
simulated and in theory (P − 1)/(M + P − 1); bytes per step between stages, towers and replicas
(computed from the network's shapes by the cost model, not measured); each rank's peak memory; the
prediction (costmodel.predict with W's profile) and its error; the ratios to the plain trainer, DDP
and DeepSpeed's partition. Rows for GPU counts this machine lacks (--gpu-workers, assumed H100
profiles, the paper network) are predictions and labelled so.

`--repeats N` runs the whole sweep N times in rounds, each calibrating afresh and every second one in
the opposite order; each configuration's row then holds the median images/s of its runs (and the
median prediction, each run's with the background the runs before it measured) with every run's
figures: on a machine whose speed drifts from minute to minute, one run of a configuration is one draw.
A resumed sweep may be given more rounds than it had.

A configuration that fails becomes a row with its error and the sweep goes on. Every finished
configuration is appended to OUT/scaling.rows.jsonl at once, so the same command run again resumes
after the last one (`--fresh` starts over). Outputs under OUT: scaling.json / .csv / .md, the PNG
plots, profiles/ (the calibrations) and logs/ (each configuration's output).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from alexnet_pp.config import PRESETS, ModelConfig, RunConfig, load_config
from alexnet_pp.errors import ConfigError
from alexnet_pp.host import cores
from alexnet_pp.pipeline import unit_names
from cluster.bench.report import Column, Report, Table, environment, load_average

KINDS = ("calibration", "plain", "ddp", "engine", "ds-default")
BASELINES = ("plain", "ddp", "ds-default")
PHASES = ("forward", "backward", "send", "recv", "idle", "data_wait", "optimizer")
GPU_PROFILES = ("h100-nvlink", "h100-ib")
TOLERANCE = 0.15  # the prediction's goal: within 15 % of the measurement


# --- what a sweep runs -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    """One configuration of the sweep."""

    kind: str
    workers: int
    pp: int = 1
    tp: int = 1
    dp: int = 1
    m: int = 1
    round: int = 0  # which of --repeats rounds (0: the first)
    around: str = ""  # a calibration of one layout's run: "before" or "after" it ("": of the worker count)
    target: str = ""  # that layout's kind (engine, ds-default)

    @property
    def id(self) -> str:
        return self.base_id + (f"#{self.round + 1}" if self.round else "")

    @property
    def base_id(self) -> str:
        """The configuration, whichever round measured it."""
        if self.around:
            return f"calibration:{self.target}:{self.pp}x{self.tp}x{self.dp}:M{self.m}:{self.around}"
        if self.kind in ("calibration", "plain", "ddp"):
            return f"{self.kind}:W{self.workers}"
        return f"{self.kind}:{self.pp}x{self.tp}x{self.dp}:M{self.m}"

    @property
    def label(self) -> str:
        return self.base_label + (f" (run {self.round + 1})" if self.round else "")

    @property
    def base_label(self) -> str:
        if self.around:
            return f"calibrate {self.around} {self.bracketed.base_label}"
        if self.kind == "calibration":
            return f"calibrate W={self.workers}"
        if self.kind == "plain":
            return f"plain trainer (W={self.workers})"
        if self.kind == "ddp":
            return f"DDP ×{self.workers}"
        suffix = " DS parameters" if self.kind == "ds-default" else ""
        return f"{self.pp}×{self.tp}×{self.dp} M{self.m}{suffix}"

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "-", self.id).strip("-")

    @property
    def bracketed(self) -> "Spec":
        """The layout run this calibration is taken right before or after."""
        return dataclasses.replace(self, kind=self.target, around="", target="")

    def calibrations(self) -> tuple["Spec", "Spec"]:
        """The calibrations right before and right after this layout's run (--calibrate layout)."""
        return tuple(dataclasses.replace(self, kind="calibration", around=a, target=self.kind)  # type: ignore[return-value]
                     for a in ("before", "after"))


def parse_layout(text: str) -> tuple[int, int, int, int]:
    parts = [int(x) for x in text.split(",")]
    if len(parts) not in (3, 4) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a layout is P,T,D or P,T,D,M (positive integers)")
    return (*parts, 1) if len(parts) == 3 else tuple(parts)  # type: ignore[return-value]


def layouts_for(workers: int, batch: int, micro_batches: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """Every (P, T, D, M) with P·T·D = workers and P at most the pipeline units at T; M from
    `micro_batches` where P > 1, else 1 (one stage has no pipeline to fill); the batch must split
    into D·M whole micro-batches."""
    out = []
    for tp in (1, 2):
        if workers % tp:
            continue
        for pp in range(1, min(workers // tp, len(unit_names(tp))) + 1):
            if (workers // tp) % pp:
                continue
            dp = workers // (tp * pp)
            for m in ((1,) if pp == 1 else micro_batches):
                if batch % (dp * m) == 0:
                    out.append((pp, tp, dp, m))
    return out


def plan(workers: Sequence[int], batch: int, micro_batches: Sequence[int], baselines: Sequence[str],
         layouts: Optional[Sequence[tuple[int, int, int, int]]] = None, predict: bool = True,
         repeats: int = 1, calibrate: str = "worker-count") -> list[Spec]:
    """The sweep in the order it runs: per worker count, calibration, baselines, then the layouts
    (each pipeline followed by DeepSpeed's partition of it). With explicit `layouts`, calibration
    and baselines run for the counts that are also in `workers`. `calibrate="layout"`: instead of
    once per worker count, a calibration right before and right after each layout's run. `repeats`
    > 1: that many rounds, each calibrating afresh; every second round runs each worker count's
    configurations in the opposite order, so no configuration always follows the same one."""
    one = _one_round(workers, batch, micro_batches, baselines, layouts, predict and calibrate == "worker-count")
    specs: list[Spec] = []
    for r in range(repeats):
        for w in sorted({s.workers for s in one}):
            block = [s for s in one if s.workers == w]
            if r % 2:
                cal = [s for s in block if s.kind == "calibration"]
                block = cal + [s for s in reversed(block) if s.kind != "calibration"]
            for s in block:
                s = dataclasses.replace(s, round=r)
                if s.kind in ("engine", "ds-default") and predict and calibrate == "layout":
                    before, after = s.calibrations()
                    specs += [before, s, after]
                else:
                    specs.append(s)
    return specs


def _one_round(workers: Sequence[int], batch: int, micro_batches: Sequence[int], baselines: Sequence[str],
               layouts: Optional[Sequence[tuple[int, int, int, int]]], predict: bool) -> list[Spec]:
    counts = sorted({p * t * d for p, t, d, _ in layouts}) if layouts else sorted(set(workers))
    specs: list[Spec] = []
    for w in counts:
        mine = [lay for lay in layouts if lay[0] * lay[1] * lay[2] == w] if layouts else layouts_for(w, batch, micro_batches)
        swept = w in workers
        if predict and mine and swept:
            specs.append(Spec("calibration", w))
        if "plain" in baselines and swept:
            specs.append(Spec("plain", w))
        if "ddp" in baselines and w > 1 and swept:  # one process is the plain trainer
            specs.append(Spec("ddp", w, dp=w))
        for pp, tp, dp, m in mine:
            specs.append(Spec("engine", w, pp, tp, dp, m))
            if "ds-default" in baselines and pp > 1:
                specs.append(Spec("ds-default", w, pp, tp, dp, m))
    return specs


# --- the sweep's context ---------------------------------------------------------------------------

class Sweep:
    """Settings, base config and files of one sweep; runs its specs (`run_spec`)."""

    def __init__(self, args: argparse.Namespace, argv: Sequence[str]):
        self.args, self.argv = args, list(argv)
        self.out = Path(args.out)
        # each run's own files (config, checkpoints, Ray's records): removed after the run
        self.scratch = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="alexnet-pp-scaling-"))
        self.own_scratch = not args.scratch
        self.overrides = dict(kv.split("=", 1) for kv in args.set)
        self.base = load_config(args.preset, None, self.overrides, check_data=args.data == "shards")
        self.batch = args.batch or self.base.train.batch_size
        self.device = "cuda" if args.gpus_per_worker > 0 else "cpu"
        self.rows_path = self.out / "scaling.rows.jsonl"
        self.specs: list[Spec] = []
        self._links: dict[tuple[int, int], tuple[Any, Any]] = {}  # by (processes training beside, round)
        self._slowdown: dict[int, float] = {}  # by worker count
        self._profiles: dict[Path, Any] = {}  # calibrations read, by path
        self._cpu_ratios: dict[str, Optional[float]] = {}  # compute_cpu_ratio, by row id

    @property
    def model(self) -> ModelConfig:
        return self.base.model

    def settings(self) -> dict[str, Any]:
        """What the numbers depend on: a resumed sweep must have the same."""
        a = self.args
        return {"preset": a.preset, "overrides": a.set, "batch": self.batch, "steps": a.steps, "warmup": a.warmup,
                "calibrate": a.calibrate,
                "threads_per_worker": a.threads, "data": a.data, "launcher": a.launcher, "partition": a.partition,
                "gpus_per_worker": a.gpus_per_worker, "distinct_batches": a.distinct_batches,
                "calibration_reps": a.calibration_reps, "model": dataclasses.asdict(self.model)}

    # --- configs ----------------------------------------------------------------------------------

    def engine_config(self, spec: Spec) -> RunConfig:
        a = self.args
        overrides = {
            **self.overrides,
            "parallel.pp": str(spec.pp), "parallel.tp": str(spec.tp), "parallel.dp": str(spec.dp),
            "parallel.micro_batches": str(spec.m),
            "parallel.partition": "parameters" if spec.kind == "ds-default" else a.partition,
            "parallel.gpus_per_worker": str(a.gpus_per_worker),
            "train.batch_size": str(self.batch), "train.max_steps": str(a.warmup + a.steps),
            "train.threads": str(a.threads), "train.schedule": "constant", "train.eval_every": "1000000",
            "checkpoint.resume": "false", "checkpoint.dir": str((self.scratch / spec.slug / "ckpt").absolute()),
            "out_dir": str(self.scratch.absolute()), "name": spec.slug, "metrics.enabled": "false",
        }
        if a.data == "tensors":
            overrides["train.epochs"] = "1"  # an epoch is the run's warm-up + timed steps
        return load_config(a.preset, None, overrides, check_data=a.data == "shards")

    def baseline_job(self):
        from cluster.bench.baselines import BaselineJob

        a = self.args
        return BaselineJob(model=dataclasses.asdict(self.model), train=dataclasses.asdict(self.base.train),
                           steps=a.warmup + a.steps, warmup=a.warmup, batch=self.batch, threads=a.threads,
                           distinct=a.distinct_batches, seed=self.base.train.seed, device=self.device,
                           collective_timeout_s=self.base.parallel.collective_timeout_s)

    # --- runs ---------------------------------------------------------------------------------------

    def run_spec(self, spec: Spec) -> dict[str, Any]:
        return {"calibration": self.calibrate, "plain": self.run_plain, "ddp": self.run_ddp,
                "engine": self.run_engine, "ds-default": self.run_engine}[spec.kind](spec)

    def run_plain(self, spec: Spec) -> dict[str, Any]:
        from cluster.bench import baselines

        threads = min(spec.workers * self.args.threads, cores()) if self.device == "cpu" else self.args.threads
        job = dataclasses.replace(self.baseline_job(), threads=threads)
        return {"threads": threads, **baselines.run(job, 1)}

    def run_ddp(self, spec: Spec) -> dict[str, Any]:
        from cluster.bench import baselines

        return {"threads": self.args.threads, **baselines.run(self.baseline_job(), spec.workers)}

    def run_engine(self, spec: Spec) -> dict[str, Any]:
        from alexnet_pp.layout import Layout
        from cluster.bench.synthetic import SyntheticBatches

        a = self.args
        cfg = self.engine_config(spec)
        layout = Layout.from_config(cfg)  # a layout that cannot be: ConfigError, recorded as the row's error
        factory = None
        if a.data == "tensors":
            factory = SyntheticBatches(layout, a.warmup + a.steps, self.batch, cfg.model.image_size,
                                       cfg.model.num_classes, a.distinct_batches, cfg.train.seed)
        try:
            if a.launcher == "ray":
                from cluster.driver import run_job

                summary = run_job(cfg, layout, address=a.address, data_factory=factory, warmup_steps=a.warmup)
                if not summary.ok:
                    raise RuntimeError(summary.error or "the job failed")
            else:
                from cluster.run_summary import summarize_run
                from cluster.spawn import run_local

                if a.data == "shards":
                    from alexnet_pp.data import ensure_dataset

                    ensure_dataset(cfg)
                ranks = run_local(cfg, factory, threads=a.threads, layout=layout)
                summary = summarize_run(ranks, a.warmup)
                lead = next(r for r in ranks if r.coord["rank"] == 0)
                summary.losses, summary.cut = lead.losses, lead.cut
        finally:
            shutil.rmtree(self.scratch / spec.slug, ignore_errors=True)  # checkpoints, run files
        return {"partition": cfg.parallel.partition, "cut": summary.cut, "images_per_s": summary.images_per_sec,
                "step_p50_s": summary.step_time_p50, "step_p95_s": summary.step_time_p95,
                "steps_timed": summary.steps_timed, "bubble_theory": summary.theoretical_bubble,
                "bubble_measured": summary.bubble_per_stage, "phases_s": exclusive_idle(summary.phase_seconds_per_stage),
                "peak_memory_bytes": summary.peak_memory_per_rank, "losses": summary.losses,
                "cpu_share": summary.cpu_share_per_stage, "phases_cpu_s": summary.phase_cpu_seconds_per_stage,
                "host_busy_cores": _finite(summary.host_busy_cores),
                "outside_ranks_cores": _finite(summary.outside_ranks_cores)}

    def links(self, workers: int, round: int = 0):
        """(p2p, all-reduce) on the run's backend, each measured once a round (predictions take the
        median over the rounds, Sweep.profile). On a CPU the p2p link is measured between two of W
        workers while the others train beside, as many as the cores hold: a pipeline's blocked
        receiver waits for a core to wake on, and its send for the receiver. The all-reduce is always
        measured between two processes alone: the cost model shares the cores in the step's tail
        itself (costmodel.tail_rate)."""
        from alexnet_pp.planning.profile import measure_links

        backend = "nccl" if self.device == "cuda" else "gloo"
        if (0, round) not in self._links:
            self._links[0, round] = measure_links(backend)
        alone = self._links[0, round]
        beside = self.link_beside(workers)
        if not beside:
            return alone
        if (beside, round) not in self._links:
            self._links[beside, round] = measure_links(
                backend, beside=(self.model, beside, self.smallest_micro_batch(workers)))
        return self._links[beside, round][0], alone[1]

    def link_beside(self, workers: int) -> int:
        """Processes training beside the p2p link's measurement for runs of `workers` (none on GPUs)."""
        return link_co_runners(workers, self.args.threads) if self.device == "cpu" else 0

    def slowdown(self, workers: int) -> float:
        """The time-slicing slowdown for runs of `workers` (profile.time_slicing_slowdown), measured
        once a sweep where their threads outnumber the cores; 1 elsewhere."""
        from alexnet_pp.planning.profile import oversubscribed, time_slicing_slowdown

        if self.device != "cpu" or not oversubscribed(workers, self.args.threads, cores()):
            return 1.0
        if workers not in self._slowdown:
            self._slowdown[workers] = time_slicing_slowdown(
                self.model, workers, co_runners(workers, self.args.threads), self.args.threads,
                self.smallest_micro_batch(workers))
        return self._slowdown[workers]

    def smallest_micro_batch(self, workers: int) -> int:
        return min((self.batch // (s.dp * s.m) for s in self.specs if s.workers == workers), default=self.batch)

    def calibrate(self, spec: Spec) -> dict[str, Any]:
        from alexnet_pp.layout import Layout
        from alexnet_pp.planning.profile import measure_profile, with_time_slicing

        if spec.around:  # the layout's micro-batch only
            try:
                Layout.from_config(self.engine_config(spec.bracketed))
            except ConfigError as e:  # the layout's own row records why
                return {"skipped": f"the layout cannot be: {e}"}
            sizes = [self.batch // (spec.dp * spec.m)]
        else:
            sizes = sorted({self.batch // (s.dp * s.m) for s in self.specs if s.workers == spec.workers
                            and s.kind in ("engine", "ds-default")})
        co = co_runners(spec.workers, self.args.threads) if self.device == "cpu" else 0
        multi_gpu = self.device == "cuda" and _gpu_count() >= 2
        measured_links = self.device == "cpu" or multi_gpu
        p2p, allreduce = self.links(spec.workers, spec.round) if measured_links else (None, None)
        profile = measure_profile(self.model, sizes, self.device, reps=self.args.calibration_reps,
                                  threads=self.args.threads, links="assume", co_runners=co,
                                  name=f"measured-w{spec.workers}" + (f"-{spec.around}" if spec.around else ""))
        if measured_links:
            beside = self.link_beside(spec.workers)
            profile = dataclasses.replace(
                profile, p2p=p2p, allreduce=allreduce,
                assumptions=[x for x in profile.assumptions if not x.startswith("links")]
                + [f"links measured once a round between two processes of this machine on "
                   f"{'nccl' if self.device == 'cuda' else 'gloo'}"
                   + (f", p2p while {beside} other(s) trained beside" if beside else "")])
        slowdown = self.slowdown(spec.workers)
        if slowdown != 1.0:
            profile = with_time_slicing(profile, slowdown, spec.workers, ", measured once in this sweep")
        path = self.spec_profile_path(spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        profile.save(path)
        return {"micro_batch_sizes": sizes, "co_runners": co, "profile": str(path.relative_to(self.out))}

    def profile_path(self, workers: int, round: int = 0) -> Path:
        return self.out / "profiles" / (f"w{workers}.json" if not round else f"w{workers}-run{round + 1}.json")

    def spec_profile_path(self, spec: Spec) -> Path:
        return self.out / "profiles" / f"{spec.slug}.json" if spec.around else self.profile_path(spec.workers, spec.round)

    def profile(self, row: dict[str, Any]):
        """The profile a measured layout's row is predicted from: its own calibrations (the mean of
        those right before and right after its run where they were taken, --calibrate layout, else
        its round's calibration of its worker count) with the unit, optimizer and gradient-sweep
        times pooled over every calibration this sweep has taken at the same micro-batch sizes,
        threads and co-runners (profile.pooled_profile), and its links the medians over the
        calibrations of its worker count (one a round: a link measured while the machine is busy,
        say as the last run's processes exit, can take ten times as long); None without a
        calibration of its own."""
        from alexnet_pp.planning.profile import mean_profile, median_links, pooled_profile

        spec = Spec(row["kind"], row["workers"], row["pp"], row["tp"], row["dp"], row["micro_batches"],
                    row.get("round", 0))
        around = [p for p in map(self.spec_profile_path, spec.calibrations()) if p.is_file()]
        if around:
            own = mean_profile([self._load_profile(p) for p in around])
        else:
            path = self.profile_path(row["workers"], row.get("round", 0))
            if not path.is_file():
                return None
            own = self._load_profile(path)
        taken = [(s.workers, self.spec_profile_path(s)) for s in self.specs if s.kind == "calibration"]
        taken = [(w, self._load_profile(p)) for w, p in taken if p.is_file()]
        pooled = pooled_profile(own, [p for _, p in taken])
        p2p, allreduce = median_links([p for w, p in taken if w == row["workers"]] or [own])
        return dataclasses.replace(pooled, p2p=p2p, allreduce=allreduce)

    def _load_profile(self, path: Path):
        """A calibration's profile, read once per sweep (a report predicts every row from them all)."""
        from alexnet_pp.planning.profile import DeviceProfile

        if path not in self._profiles:
            self._profiles[path] = DeviceProfile.load(path)
        return self._profiles[path]


def co_runners(workers: int, threads: int) -> int:
    """Processes to train beside the calibration: the run's other workers, as many as the cores hold
    with the timed one. Past that the OS time-slices them, and a unit's few milliseconds measure where
    the slices fell; the cost model shares the cores among the ranks that compute at once instead
    (costmodel.compute_rate), from units timed on a full but not oversubscribed machine."""
    return min(workers, max(1, cores() // max(threads, 1))) - 1


def link_co_runners(workers: int, threads: int) -> int:
    """Processes to train beside the p2p link's measurement: the run's W − 2 other workers, as many
    as the cores hold (more would measure where their slices fell)."""
    return max(0, min(workers - 2, cores() // max(threads, 1)))


def exclusive_idle(phases: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per stage, `idle` as the time in no timed instruction, so the phases add up to the step. The
    engine's idle (cluster/timing.py), from which the bubble comes, also holds the time a blocking
    send or receive waited for its peer, which `send` and `recv` already count."""
    return {stage: {**ph, "idle": max(0.0, ph.get("idle", 0.0) - ph.get("send", 0.0) - ph.get("recv", 0.0))}
            for stage, ph in phases.items()}


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


# --- predictions and derived columns ---------------------------------------------------------------

def _finite(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None


def background_of(earlier: Sequence[dict[str, Any]], workers: int) -> Optional[dict[str, Any]]:
    """What else took the shared cores while layouts ran, from runs this sweep finished before the
    one to predict (never from that run): the medians over those at the same worker count, else over
    all of them, of the cores outside the ranks' processes (Ray's daemons, the training controller)
    and of each rank's threads beside its schedule thread (communication, Ray's core worker).
    None before any run measured them (one from an older sweep, or a machine without /proc/stat)."""
    measured = [r for r in earlier if r["kind"] in ("engine", "ds-default") and r.get("status") == "ok"
                and r.get("outside_ranks_cores") is not None and r.get("cpu_share")]
    use = [r for r in measured if r["workers"] == workers] or measured
    if not use:
        return None
    return {"cores": statistics.median(r["outside_ranks_cores"] for r in use),
            "cores_per_rank": statistics.median(map(other_threads_cores, use)), "runs": len(use)}


def cpu_ratio_of(sweep: "Sweep", earlier: Sequence[dict[str, Any]], workers: int) -> Optional[dict[str, Any]]:
    """How much more CPU a pass's forward and backward cost in this sweep's runs at `workers` than
    calibrated: the median over the runs before the one to predict (never that run) of each run's
    compute_cpu_ratio. Only runs at the same worker count: the engine's overheads and the caches the
    other ranks fill change with it. None before any such run recorded its phases' CPU."""
    ratios = [x for r in earlier if r["kind"] in ("engine", "ds-default") and r.get("status") == "ok"
              and r["workers"] == workers and (x := compute_cpu_ratio(sweep, r)) is not None]
    if not ratios:
        return None
    return {"ratio": statistics.median(ratios), "runs": len(ratios)}


def compute_cpu_ratio(sweep: "Sweep", row: dict[str, Any]) -> Optional[float]:
    """A run's schedule threads' CPU in its forward and backward phases (per rank of each stage, summed
    over the stages) over the CPU the cost model charges them from the run's calibration alone, at its
    cut: engine overheads, caches other processes filled and time slicing, which a calibration cannot
    see. None without phase CPU (a run from before it was recorded) or a calibration."""
    from alexnet_pp.planning.costmodel import Candidate, predict

    if not row.get("phases_cpu_s"):
        return None
    key = row.get("id")
    if key in sweep._cpu_ratios:
        return sweep._cpu_ratios[key]
    ratio = None
    profile = sweep.profile(row)
    if profile is not None and profile.cores:
        profile = dataclasses.replace(profile, time_slicing_slowdown=1.0, engine_cpu_ratio=0.0)
        partition = row.get("cut") or ("parameters" if row["kind"] == "ds-default" else sweep.args.partition)
        cand = Candidate(row["pp"], row["tp"], row["dp"], row["micro_batches"], row["batch"], "1f1b", partition)
        try:
            pred = predict(sweep.model, profile, cand, flat_grads=sweep.base.parallel.flat_grads)
        except (ValueError, ConfigError):
            pred = None
        if pred is not None:
            charged = sum(sp.cpu.get("forward", 0.0) + sp.cpu.get("backward", 0.0) for sp in pred.stages)
            measured = sum(sum(row["phases_cpu_s"].get(str(sp.stage), {}).get(k, 0.0)
                               for k in ("forward", "backward", "backward_weight")) for sp in pred.stages)
            ratio = measured / charged if charged > 0 and measured > 0 else None
    if key is not None:
        sweep._cpu_ratios[key] = ratio
    return ratio


def charged_cores(background: dict[str, Any], workers: int) -> float:
    """The cores a background (background_of) takes from a run of `workers` ranks, as the cost model
    charges them (costmodel.available_cores)."""
    return background["cores"] + workers * background["cores_per_rank"]


def other_threads_cores(r: dict[str, Any]) -> float:
    """Cores' worth of CPU of a rank's threads beside its schedule thread, the mean over the stages."""
    return statistics.fmean(v["other_threads"] for v in r["cpu_share"].values())


def predict_row(sweep: Sweep, row: dict[str, Any], background: Optional[dict[str, Any]] = None,
                cpu_ratio: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The cost model's numbers for a measured layout row (W's profile, with `background`'s share of
    the cores taken and `cpu_ratio`'s engine CPU charged when given; bytes need none)."""
    from alexnet_pp.planning.costmodel import Candidate, predict

    from alexnet_pp.planning.profile import assumed_gpu_profile

    profile = sweep.profile(row)
    # the cut the run trained on (the engine's live check may move the layout's first cut), so the
    # error is the cost model's, not a different choice of cut
    partition = row.get("cut") or ("parameters" if row["kind"] == "ds-default" else sweep.args.partition)
    if profile is not None and background is not None:
        profile = dataclasses.replace(profile, background_cores=background["cores"],
                                      background_cores_per_rank=background["cores_per_rank"])
    if profile is not None and cpu_ratio is not None:
        profile = dataclasses.replace(profile, engine_cpu_ratio=cpu_ratio["ratio"])
    cand = Candidate(row["pp"], row["tp"], row["dp"], row["micro_batches"], row["batch"], "1f1b", partition)
    try:  # without a calibration (--no-predict) only the bytes, which no profile changes
        pred = predict(sweep.model, profile or assumed_gpu_profile(GPU_PROFILES[0], sweep.model), cand,
                       flat_grads=sweep.base.parallel.flat_grads)
    except (ValueError, ConfigError) as e:
        return {"prediction_error_text": str(e)}
    traffic = {"bytes_stages": pred.bytes_per_step["stages"], "bytes_towers": pred.bytes_per_step["towers"],
               "bytes_replicas": pred.bytes_per_step["replicas"]}
    if profile is None:
        return traffic
    out = {**traffic, "predicted_images_per_s": pred.images_per_s, "predicted_step_s": pred.step_seconds,
           "predicted_bounds": list(pred.bounds), "predicted_cut": pred.cut.cut_points(row["tp"]),
           "predicted_extrapolated": pred.extrapolated,
           "predicted_bubble": {str(s.stage): s.bubble for s in pred.stages},
           "predicted_phases_s": {str(s.stage): {k: v for k, v in s.phases.items()} for s in pred.stages},
           "predicted_phases_cpu_s": {str(s.stage): dict(s.cpu) for s in pred.stages if s.cpu},
           "predicted_memory_bytes": pred.memory_per_worker, "profile": profile.name,
           "predicted_background": background, "predicted_cpu_ratio": cpu_ratio}
    if row.get("images_per_s"):
        out["prediction_error"] = row["images_per_s"] / pred.images_per_s - 1
    return out


def ddp_replica_bytes(model: ModelConfig, workers: int) -> int:
    """Bytes a step's gradient all-reduce moves over the whole job (ring: 2(D − 1) × the gradients),
    as the cost model counts replica traffic; computed from the parameter count."""
    from alexnet_pp.model import AlexNet

    params = sum(p.numel() for p in AlexNet(model).parameters())
    return 2 * (workers - 1) * 4 * params


def with_predictions(sweep: Sweep, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each measured layout's row with its prediction from its calibrations and the background the
    runs before it measured (`rows` in the order they ran)."""
    out: list[dict[str, Any]] = []
    for r in rows:
        out.append(with_prediction(sweep, r, out))
    return out


def with_prediction(sweep: Sweep, row: dict[str, Any], earlier: Sequence[dict[str, Any]]) -> dict[str, Any]:
    if row["kind"] not in ("engine", "ds-default"):
        return row
    return {**row, **predict_row(sweep, row, background_of(earlier, row["workers"]),
                                 cpu_ratio_of(sweep, earlier, row["workers"]))}


def combine_runs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration from its rounds (--repeats): images/s and predicted images/s are
    the medians over the rounds that ran, the error is the medians', and every run's figures stay
    (`images_per_s_runs`, `predicted_images_per_s_runs`, `prediction_error_runs`); the rest of the
    row (phases, bubble, memory, step times) is the run whose images/s is the median (the lower of
    the two middle ones for an even count). A configuration no round ran is its first failure."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r.get("base_id", r["id"]), []).append(r)
    out = []
    for base, runs in groups.items():
        if len(runs) == 1 and not runs[0].get("round"):
            out.append(runs[0])
            continue
        ok = sorted((r for r in runs if r.get("status") == "ok" and r.get("images_per_s")),
                    key=lambda r: r["images_per_s"])
        first = dict(ok[(len(ok) - 1) // 2] if ok else runs[0])
        first.update(id=base, label=first.get("base_label", first["label"]), runs=len(ok), runs_failed=len(runs) - len(ok))
        first.pop("round", None)
        if ok:
            ips = [r["images_per_s"] for r in ok]
            first.update(images_per_s=statistics.median(ips), images_per_s_runs=ips)
            pred = [r["predicted_images_per_s"] for r in ok if r.get("predicted_images_per_s")]
            if len(pred) == len(ok):
                first.update(predicted_images_per_s=statistics.median(pred), predicted_images_per_s_runs=pred,
                             prediction_error=statistics.median(ips) / statistics.median(pred) - 1,
                             prediction_error_runs=[r["prediction_error"] for r in ok])
        if first["kind"] == "calibration":
            first["profiles"] = [r["profile"] for r in runs if r.get("profile")]
        out.append(first)
    return out


def derive(sweep: Sweep, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows (predicted, one per configuration) with efficiencies and the ratios to the baselines filled in."""
    ok = [r for r in rows if r.get("status") == "ok"]
    by_kind: dict[tuple[str, int], dict[str, Any]] = {(r["kind"], r["workers"]): r for r in ok if r["kind"] in ("plain", "ddp")}
    ds = {(r["pp"], r["tp"], r["dp"], r["micro_batches"]): r for r in ok if r["kind"] == "ds-default"}
    one = next((r for r in ok if r["kind"] == "engine" and r["workers"] == 1), None)
    replica_bytes: dict[int, int] = {}
    out = []
    for r in rows:
        r = dict(r)
        if r.get("status") != "ok" or not r.get("images_per_s"):
            out.append(r)
            continue
        ips, w = r["images_per_s"], r["workers"]
        ref = {"engine": one, "ds-default": one, "plain": by_kind.get(("plain", 1)),
               "ddp": by_kind.get(("ddp", 1)) or by_kind.get(("plain", 1))}.get(r["kind"])
        if ref and ref.get("images_per_s"):
            r["efficiency"] = ips / (w * ref["images_per_s"])
        for name, base in (("plain", by_kind.get(("plain", w))), ("ddp", by_kind.get(("ddp", w)))):
            if base and base is not r and base.get("images_per_s"):
                r[f"{name}_images_per_s"] = base["images_per_s"]
                r[f"vs_{name}"] = ips / base["images_per_s"]
        if r["kind"] == "engine" and r["pp"] > 1:
            base = ds.get((r["pp"], r["tp"], r["dp"], r["micro_batches"]))
            if base:
                r["ds_default_images_per_s"] = base["images_per_s"]
                r["vs_ds_default"] = ips / base["images_per_s"]
        if r["kind"] == "ddp":
            if w not in replica_bytes:
                replica_bytes[w] = ddp_replica_bytes(sweep.model, w)
            r.update(bytes_stages=0, bytes_towers=0, bytes_replicas=replica_bytes[w])
        if r["kind"] == "plain":
            r.update(bytes_stages=0, bytes_towers=0, bytes_replicas=0)
        peaks = r.get("peak_memory_bytes") or {}
        if peaks:
            r["peak_memory_max_bytes"] = max(peaks.values())
        out.append(r)
    return out


def gpu_predictions(worker_counts: Sequence[int], per_worker: int, min_micro_batch: int) -> list[dict[str, Any]]:
    """PREDICTED rows for GPU counts this machine lacks: the paper network at `per_worker` images per
    GPU (weak scaling), the best layout the planner finds and the data-parallel-only layout, on the
    assumed H100 profiles (alexnet_pp.planning.profile.assumed_gpu_profile)."""
    from alexnet_pp.planning.costmodel import Candidate, predict
    from alexnet_pp.planning.planner import rank_layouts
    from alexnet_pp.planning.profile import assumed_gpu_profile

    model = ModelConfig()
    rows = []
    for name in GPU_PROFILES:
        profile = assumed_gpu_profile(name, model)
        base = None
        for w in sorted({1, *worker_counts}):
            batch = per_worker * w
            best = rank_layouts(model, profile, w, batch, ("1f1b",), None, "measured", min(min_micro_batch, per_worker))[0]
            dp_only = predict(model, profile, Candidate(1, 1, w, 1, batch))
            base = base or best.images_per_s
            L = best.layout
            rows.append({"id": f"predicted-gpu:{name}:W{w}", "kind": "predicted-gpu", "status": "predicted",
                         "profile": name, "workers": w, "batch": batch, "pp": L.pp, "tp": L.tp, "dp": L.dp,
                         "micro_batches": L.micro_batches, "micro_batch": L.micro_batch,
                         "predicted_images_per_s": best.images_per_s, "predicted_step_s": best.step_seconds,
                         "predicted_efficiency": best.images_per_s / (w * base), "predicted_bubble_max": best.bubble,
                         "predicted_memory_bytes": best.memory_per_worker, "fits": best.fits,
                         "dp_only_images_per_s": dp_only.images_per_s,
                         "bytes_stages": best.bytes_per_step["stages"], "bytes_towers": best.bytes_per_step["towers"],
                         "bytes_replicas": best.bytes_per_step["replicas"]})
    return rows


# --- files: rows as they finish, then the report ---------------------------------------------------

def load_rows(path: Path, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The rows a previous run of the same sweep finished (resume); other settings: an error."""
    if not path.is_file():
        return {}
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    if not lines or lines[0].get("settings") != json.loads(json.dumps(settings)):
        raise ConfigError(f"{path} holds a sweep measured with other settings; pass --fresh to start over, "
                          "or choose another --out")
    done: dict[str, dict[str, Any]] = {}
    for rec in lines[1:]:
        if "id" in rec:
            done[rec["id"]] = rec
    return done


def append_row(path: Path, row: dict[str, Any], settings: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = not path.is_file() or path.stat().st_size == 0
    with open(path, "a") as f:
        if fresh:
            f.write(json.dumps({"settings": settings}) + "\n")
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send this process's and its children's stdout and stderr (file descriptors 1 and 2) to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _ms(x: Optional[float]) -> Optional[float]:
    return None if x is None else 1000 * x


def _mib(x: Optional[float]) -> Optional[float]:
    return None if x is None else x / 2**20


def _mb(x: Optional[float]) -> Optional[float]:
    return None if x is None else x / 1e6


def _bubble(r: dict[str, Any]) -> Optional[str]:
    measured = r.get("bubble_measured") or {}
    if not measured or r.get("pp", 1) < 2:
        return None
    sim = r.get("predicted_bubble") or {}
    return " / ".join(f"{v:.2f}" + (f" ({sim[k]:.2f})" if k in sim else "") for k, v in sorted(measured.items())) \
        + f" vs {r.get('bubble_theory', math.nan):.2f}"


def _ratio(key: str) -> Callable[[dict[str, Any]], Optional[str]]:
    def cell(r: dict[str, Any]) -> Optional[str]:
        v = r.get(key)
        return None if v is None else f"{v:.2f}×"

    return cell


def _with_runs(key: str) -> Callable[[dict[str, Any]], Optional[str]]:
    """The figure; over several rounds, the median and the range of the runs."""
    def cell(r: dict[str, Any]) -> Optional[str]:
        if r.get(key) is None:
            return None
        runs = r.get(f"{key}_runs") or []
        return f"{r[key]:.1f}" + (f" ({min(runs):.0f}–{max(runs):.0f})" if len(runs) > 1 else "")
    return cell


def _error(r: dict[str, Any]) -> Optional[str]:
    if "prediction_error" not in r:
        return None
    runs = r.get("prediction_error_runs") or []
    spread = f" ({100 * min(runs):+.0f}…{100 * max(runs):+.0f}%)" if len(runs) > 1 else ""
    return f"{100 * r['prediction_error']:+.0f}%{spread}"


def _bytes(r: dict[str, Any]) -> Optional[str]:
    if r.get("bytes_stages") is None:
        return None
    return f"{_mb(r['bytes_stages']):.1f} / {_mb(r['bytes_towers']):.1f} / {_mb(r['bytes_replicas']):.1f}"


def _background(r: dict[str, Any]) -> Optional[str]:
    measured = background_cores(r)
    used = r.get("predicted_background")
    if measured is None and not used:
        return None
    text = "–" if measured is None else f"{measured:.2f}"
    return text + (f" ({charged_cores(used, r['workers']):.2f})" if used else "")


def background_cores(r: dict[str, Any]) -> Optional[float]:
    """A run's CPU outside its ranks' schedule threads: outside their processes, and their other threads."""
    if r.get("outside_ranks_cores") is None or not r.get("cpu_share"):
        return None
    return r["outside_ranks_cores"] + r["workers"] * other_threads_cores(r)


def build_report(sweep: Sweep, rows: list[dict[str, Any]], env: dict[str, Any], complete: bool) -> Report:
    a = sweep.args
    report = Report("scaling", sweep.out, sweep.argv, sweep.settings(), env,
                    title=f"Scaling: layouts over {', '.join(map(str, sorted({r['workers'] for r in rows if r['kind'] != 'predicted-gpu'})))} "
                          f"workers on {env.get('machine')}")
    report.rows = rows
    m = sweep.model
    measured = [r for r in rows if r["kind"] in ("engine", "ds-default")]
    base = [r for r in rows if r["kind"] in ("plain", "ddp")]
    cal = [r for r in rows if r["kind"] == "calibration"]
    gpu = [r for r in rows if r["kind"] == "predicted-gpu"]
    failed = [r for r in rows if r.get("status") == "failed"]
    where = "Ray job path (cluster.driver.run_job)" if a.launcher == "ray" else "local processes (cluster.spawn.run_local)"
    report.tables.append(Table(
        "Measured layouts: measured vs predicted images/s, beside the baselines", measured, [
            Column("layout P×T×D", lambda r: f"{r['pp']}×{r['tp']}×{r['dp']}"),
            Column("M", "micro_batches"), Column("mb", "micro_batch"), Column("W", "workers"),
            Column("partition (cut trained on)", lambda r: None if not r.get("partition") else
                   r["partition"] + (f" ({r['cut']})" if r.get("cut") else "")),
            Column("img/s measured", _with_runs("images_per_s")),
            Column("img/s predicted", _with_runs("predicted_images_per_s")),
            Column("error", _error),
            Column("efficiency", "efficiency", ".2f"),
            Column("step p50 / p95 ms", lambda r: f"{_ms(r['step_p50_s']):.0f} / {_ms(r['step_p95_s']):.0f}"),
            Column("bubble per stage (simulated) vs theory", _bubble),
            Column("plain img/s", "plain_images_per_s", ".1f"), Column("DDP img/s", "ddp_images_per_s", ".1f"),
            Column("DS parameters img/s", "ds_default_images_per_s", ".1f"),
            Column("× plain", _ratio("vs_plain")), Column("× DDP", _ratio("vs_ddp")),
            Column("× DS", _ratio("vs_ds_default")),
            Column("peak MiB (max rank)", lambda r: _mib(r.get("peak_memory_max_bytes")), ".0f"),
            Column("MB/step stages / towers / replicas", _bytes),
            Column("background cores (predicted)", _background), Column("load", "load_1min", ".1f"),
            Column("status", lambda r: r.get("status") if r.get("status") != "ok" else "")],
        intro=(f"Every layout ran {a.warmup} warm-up + {a.steps} timed steps through the {where}"
               + (f", in each of {a.repeats} rounds (each calibrated afresh, every second one in the opposite order); "
                  "img/s measured and predicted are the medians over the rounds, the run's range in brackets, and "
                  "error is the medians' (each run's against its own prediction in brackets); the other "
                  "columns are the median run's" if a.repeats > 1 else "") + ", "
               f"{a.threads} torch thread(s) per worker, on {'in-memory tensors' if a.data == 'tensors' else 'the shard stream'}; "
               f"preset `{a.preset}` (width {m.width}, {m.image_size} px, {m.num_classes} classes), batch {sweep.batch}. "
               "img/s = images of the timed steps / their time; error = measured / predicted − 1; efficiency = "
               "img/s / (W × img/s of 1×1×1). Predicted: `costmodel.predict` at the cut the run trained on with "
               + ("unit times pooled over every calibration of this sweep at the layout's micro-batch (each "
                  "layout's run calibrated right before and right after it)" if a.calibrate == "layout" else
                  "the profile calibrated in this run for W workers, its unit times pooled over every calibration "
                  "of this sweep at the same micro-batches")
               + ", the links' medians over the rounds' measurements for W and, where the workers' threads "
               "outnumber the cores, the time-slicing slowdown measured once a sweep"
               + " (on a CPU, the run's other workers training beside it, as many as the cores hold; the "
               "simulated ranks share the cores the background leaves while more compute than there are). "
               "Background cores: CPU on the machine outside the ranks' schedule threads while they stepped — the "
               "cores outside the ranks' processes (Ray's daemons, the training controller) plus W × each rank's "
               "other threads (communication, Ray's core worker) — measured in this run; in brackets what its "
               "prediction charged, the medians of the runs this sweep finished before it (at the same W where "
               "there were any), never its own. Bubble: each stage's idle share "
               "of the schedule, measured (simulated by the cost model) vs (P − 1)/(M + P − 1). `DS parameters`: the same layout cut by DeepSpeed's default "
               "`partition_method=parameters`. MB/step: computed from the network's shapes, not measured. load: the "
               f"machine's 1-minute load average when the configuration started ({env.get('cores')} cores).")))
    report.tables.append(Table("Baselines (same run, same batches)", base, [
        Column("baseline", lambda r: "plain single-process trainer" if r["kind"] == "plain" else "PyTorch DDP (gloo)"),
        Column("W", "workers"), Column("processes × threads",
                                       lambda r: f"1 × {r['threads']}" if r["kind"] == "plain" else f"{r['workers']} × {r['threads']}"),
        Column("img/s", "images_per_s", ".1f"), Column("efficiency", "efficiency", ".2f"),
        Column("step p50 / p95 ms", lambda r: f"{_ms(r['step_p50_s']):.0f} / {_ms(r['step_p95_s']):.0f}"),
        Column("× plain", _ratio("vs_plain")),
        Column("peak MiB (max rank)", lambda r: _mib(r.get("peak_memory_max_bytes")), ".0f"),
        Column("MB/step between replicas", lambda r: _mb(r.get("bytes_replicas")), ".1f"),
        Column("status", lambda r: r.get("status") if r.get("status") != "ok" else "")],
        intro=("plain: the whole network in one process with min(W × threads, cores) torch threads (the single-process "
               "trainer's step); DDP: torch.nn.parallel.DistributedDataParallel over W processes, each on its rows of "
               "the global batch (from W = 2). Efficiency against the same baseline at W = 1 (DDP: the plain trainer).")))
    phase_rows = []
    for r in measured:
        for stage, ph in sorted((r.get("phases_s") or {}).items()):
            pred = (r.get("predicted_phases_s") or {}).get(stage, {})
            phase_rows.append({"layout": r["label"], "stage": stage, **{k: ph.get(k) for k in PHASES},
                               "pred": pred, "bubble": (r.get("bubble_measured") or {}).get(stage),
                               "cpu": (r.get("cpu_share") or {}).get(stage),
                               "phase_cpu": (r.get("phases_cpu_s") or {}).get(stage),
                               "charged_cpu": (r.get("predicted_phases_cpu_s") or {}).get(stage, {})})
    report.tables.append(Table("Where each stage's step goes: measured ms per step (predicted)", phase_rows, [
        Column("layout", "layout"), Column("stage", "stage"),
        *[Column(p, (lambda p: lambda r: None if r.get(p) is None else
                     f"{_ms(r[p]):.1f}" + (f" ({_ms(r['pred'][p]):.1f})" if p in r["pred"] else ""))(p)) for p in PHASES],
        Column("bubble", "bubble", ".3f"),
        Column("CPU: schedule thread / other threads", lambda r: None if not r.get("cpu") else
               f"{r['cpu']['main_thread']:.2f} / {r['cpu']['other_threads']:.2f}"),
        Column("CPU ms: forward / backward (charged)", lambda r: None if not r.get("phase_cpu") else " / ".join(
               f"{_ms(r['phase_cpu'].get(p, 0.0)):.1f}"
               + (f" ({_ms(r['charged_cpu'][p]):.1f})" if p in r["charged_cpu"] else "") for p in ("forward", "backward")))],
        intro=("Mean seconds per timed step of one rank of the stage, per phase (cluster/timing.py); idle is the time in "
               "no timed instruction, so the phases add up to the step (the bubble also counts send and recv waits). The cost model "
               "predicts forward, backward, send, recv, idle and optimizer (its optimizer phase is the optimizer step and "
               "the engine's sweeps over the gradients around the all-reduce; the all-reduce over replicas is its own "
               "predicted phase, in the JSON); it does "
               "not model data_wait. CPU: cores' worth of CPU time per rank of the stage over its timed steps, of the "
               "thread that runs the schedule (computes, and waits in sends and receives) and of the process's other "
               "threads (communication, data, runtime); the schedule thread's share falls short of 1 by the time it "
               "waited for messages or for a core. CPU ms: the schedule thread's CPU time inside the forward and "
               "backward phases, the work they cost; against their wall time above, how much of a core they got; "
               "in brackets the CPU the cost model charges them (the calibrated unit times, with the time-slicing "
               "slowdown where the workers outnumber the cores): the model's error in work, apart from its error in "
               "sharing the cores.")))
    report.tables.append(Table("PREDICTED, not measured: GPU counts this machine lacks", gpu, [
        Column("profile", "profile"), Column("GPUs", "workers"), Column("batch", "batch"),
        Column("best layout P×T×D", lambda r: f"{r['pp']}×{r['tp']}×{r['dp']}"), Column("M", "micro_batches"),
        Column("img/s predicted", "predicted_images_per_s", ".0f"), Column("efficiency predicted", "predicted_efficiency", ".2f"),
        Column("data parallel only img/s predicted", "dp_only_images_per_s", ".0f"),
        Column("GiB per GPU", lambda r: r["predicted_memory_bytes"] / 2**30, ".1f")],
        intro=(f"The paper network (60,965,224 parameters) at {a.gpu_batch_per_worker} images per GPU, on the assumed "
               "H100 profiles of alexnet_pp/planning/profile.py (`assumed_gpu_profile`: NVLink 4 in one domain, or "
               "8 GPUs per node on NVLink joined by InfiniBand NDR), each calibrated on this repository's one measured "
               "H100 step. The planner's best layout per count; none of these numbers was measured.")))
    if failed:
        report.tables.append(Table("Failed configurations (the sweep went on)", failed, [
            Column("configuration", "label"), Column("error", lambda r: (r.get("error") or "").strip().splitlines()[-1][:300]
                                                     if r.get("error") else "")]))
    within = [abs(r["prediction_error"]) <= TOLERANCE for r in measured if "prediction_error" in r]
    worst = max((abs(r["prediction_error"]) for r in measured if "prediction_error" in r), default=None)
    if within:
        report.notes.append(f"prediction within {100 * TOLERANCE:.0f}% of the measurement for {sum(within)} of "
                            f"{len(within)} measured layouts (largest error {100 * worst:.0f}%)")
    for w in sorted({r["workers"] for r in measured}):
        bg = background_of([r for r in measured if r["workers"] == w], w)
        if bg:
            report.notes.append(f"background at W={w}, medians over {bg['runs']} layout(s): {bg['cores']:.2f} cores "
                                f"outside the ranks' processes + {bg['cores_per_rank']:.3f} per rank in its other threads "
                                f"= {charged_cores(bg, w):.2f} of {env.get('cores')} cores (for "
                                "`alexnet-pp plan --device-profile`: a profile's background_cores and "
                                "background_cores_per_rank)")
        ratio = cpu_ratio_of(sweep, [r for r in measured if r["workers"] == w], w)
        if ratio:
            report.notes.append(f"engine CPU at W={w}: the runs' forward and backward phases cost {ratio['ratio']:.2f}× "
                                f"the CPU their calibration charges (median over {ratio['runs']} layout(s)); each layout "
                                "is charged the median of the runs before it at its worker count (for `alexnet-pp plan "
                                "--device-profile`: a profile's engine_cpu_ratio)")
    loads = [r.get("load_1min") for r in rows if r.get("load_1min") is not None]
    if loads:
        report.notes.append(f"load average (1 min) before each configuration: {min(loads):.1f}–{max(loads):.1f} on "
                            f"{env.get('cores')} cores (other processes share this machine when it exceeds the workers)")
    for r in cal:
        if r.get("status") == "ok" and not r.get("around"):
            report.notes.append(f"calibration W={r['workers']}: micro-batches {r['micro_batch_sizes']}, "
                                f"{r['co_runners']} co-runner(s), profile {r['profile']}")
    around = [r for r in cal if r.get("around") and r.get("status") == "ok" and r.get("profile")]
    if around:
        co = sorted({(r["workers"], r["co_runners"]) for r in around})
        report.notes.append(f"calibrated right before and right after each layout's run, in every round: "
                            f"{len({r['base_id'].rsplit(':', 1)[0] for r in around})} "
                            "layouts' profiles under profiles/ (calibration-<layout>-before/after[-<run>].json), with "
                            + ", ".join(f"{c} co-runner(s) at W = {w}" for w, c in co))
    report.notes.append("peak memory: each rank's maximum resident set since training began (CPU, Linux VmHWM "
                        "after a reset) or CUDA memory allocated (GPU); a first stage's includes the in-memory input "
                        "batches")
    if not complete:
        report.notes.append("INCOMPLETE: the sweep was interrupted; run the same command again to resume")
    report.notes.append("each configuration's own output: logs/<configuration>.log")
    return report


# --- main ------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="alexnet-pp bench scaling", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda v: [int(x) for x in v.split(",") if x]  # noqa: E731
    ap.add_argument("--workers", type=ints, default=[1, 2, 4], help="worker counts to sweep (default 1,2,4)")
    ap.add_argument("--layouts", type=parse_layout, nargs="+", metavar="P,T,D[,M]",
                    help="run these layouts instead of every layout of --workers")
    ap.add_argument("--micro-batches", type=ints, default=[4], help="M for layouts with P > 1 (default 4)")
    ap.add_argument("--preset", choices=tuple(PRESETS), default="demo", help="network and batch (default demo)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config setting for every run, e.g. model.width=0.5 (repeatable)")
    ap.add_argument("--batch", type=int, help="global batch per optimizer step (default: the preset's)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per configuration (default 10)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds of the whole sweep, each calibrating afresh, every second one in the opposite "
                         "order; rows give the median images/s over the rounds and every run's (default 1)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps before them (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    ap.add_argument("--data", choices=("tensors", "shards"), default="tensors",
                    help="in-memory tensors (default) or the real shard stream")
    ap.add_argument("--launcher", choices=("ray", "spawn"), default="ray",
                    help="ray: the Ray job path training takes (default); spawn: local processes, no Ray start-up")
    ap.add_argument("--address", help="Ray cluster to run on (default: a local Ray per configuration)")
    ap.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (default 0: CPU processes)")
    ap.add_argument("--partition", default="measured", help="stage cuts of the layouts (default measured)")
    ap.add_argument("--baselines", default=",".join(BASELINES),
                    help=f"baselines to run beside the layouts, of {','.join(BASELINES)} (default all; '' none)")
    ap.add_argument("--no-predict", action="store_true", help="skip calibration and predictions")
    ap.add_argument("--calibrate", choices=("layout", "worker-count"), default="layout",
                    help="layout (default): calibrate right before and right after each layout's run and predict it "
                         "from their mean, the machine's speed where it ran; worker-count: once per worker count and round")
    ap.add_argument("--calibration-reps", type=int, default=5, help="timed repetitions of the calibration (median)")
    ap.add_argument("--distinct-batches", type=int, default=2, help="different in-memory batches, cycled")
    ap.add_argument("--gpu-workers", type=ints, default=[8, 64, 512],
                    help="GPU counts to predict on assumed H100 profiles ('' none; default 8,64,512)")
    ap.add_argument("--gpu-batch-per-worker", type=int, default=128, help="images per GPU for those (default 128)")
    ap.add_argument("--out", default=os.path.join("runs", "bench", "scaling"), help="folder for the results")
    ap.add_argument("--scratch", help="folder for each run's own files, removed after it (default: a new temporary "
                    "folder; on several machines give one they all see)")
    ap.add_argument("--fresh", action="store_true", help="start over instead of resuming OUT's sweep")
    ap.add_argument("--retry-failed", action="store_true", help="on resume, run failed configurations again")
    return ap


def main(argv: Optional[Sequence[str]] = None, runner: Optional[Callable[[Sweep, Spec], dict[str, Any]]] = None) -> int:
    """`runner(sweep, spec)` replaces how one configuration runs (tests)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    baselines = [b for b in args.baselines.split(",") if b]
    unknown = set(baselines) - set(BASELINES)
    if unknown:
        print(f"alexnet-pp bench scaling: unknown baseline(s) {', '.join(sorted(unknown))}; use {', '.join(BASELINES)}",
              file=sys.stderr)
        return 2
    sweep = None
    try:
        sweep = Sweep(args, argv)
        sweep.specs = plan(args.workers, sweep.batch, args.micro_batches, baselines, args.layouts, not args.no_predict,
                           args.repeats, args.calibrate)
        if args.fresh and sweep.rows_path.exists():
            sweep.rows_path.unlink()
        done = load_rows(sweep.rows_path, sweep.settings())
    except ConfigError as e:
        print(f"alexnet-pp bench scaling: {e}", file=sys.stderr)
        if sweep is not None and sweep.own_scratch:
            shutil.rmtree(sweep.scratch, ignore_errors=True)
        return 2
    env = environment()
    todo = [s for s in sweep.specs if s.id not in done
            or (args.retry_failed and done[s.id].get("status") == "failed")]
    say = _Say(len(sweep.specs), len(sweep.specs) - len(todo))
    say.line(f"scaling sweep: {len(sweep.specs)} configurations ({len(sweep.specs) - len(todo)} done before), "
             f"workers {sorted({s.workers for s in sweep.specs})}, preset {args.preset}, batch {sweep.batch}, "
             f"{args.launcher} launcher, {args.data}; results in {sweep.out}")
    run = runner or (lambda sw, spec: sw.run_spec(spec))
    complete = True
    try:
        for spec in todo:
            say.start(spec)
            row = {"id": spec.id, "base_id": spec.base_id, "round": spec.round, "kind": spec.kind, "label": spec.label,
                   "base_label": spec.base_label, "workers": spec.workers, "pp": spec.pp,
                   "tp": spec.tp, "dp": spec.dp, "micro_batches": spec.m, "batch": sweep.batch,
                   "micro_batch": sweep.batch // (spec.dp * spec.m), "launcher": args.launcher, "data": args.data,
                   "load_1min": (load_average() or [None])[0]}
            if spec.around:
                row.update(around=spec.around, target=spec.target)
            t0 = time.perf_counter()
            try:
                with output_to(sweep.out / "logs" / f"{spec.slug}.log"):
                    row.update(run(sweep, spec))
                row["status"] = "ok"
            except KeyboardInterrupt:
                raise
            except Exception as e:  # recorded; the sweep goes on
                row.update(status="failed", error=f"{type(e).__name__}: {e}".strip(),
                           traceback=traceback.format_exc()[-4000:])
            row["wall_s"] = time.perf_counter() - t0
            done[spec.id] = row
            append_row(sweep.rows_path, row, sweep.settings())
            before = sweep.specs[:sweep.specs.index(spec)]
            say.finish(spec, with_prediction(sweep, row, [done[s.id] for s in before if s.id in done]))
    except KeyboardInterrupt:
        complete = False
        say.line("interrupted: run the same command again to resume after the last finished configuration")
    try:
        sweep._cpu_ratios.clear()  # from here on every run's calibration pools all of the sweep's
        rows = derive(sweep, combine_runs(with_predictions(sweep, [done[s.id] for s in sweep.specs if s.id in done])))
        if args.gpu_workers:
            rows += gpu_predictions(args.gpu_workers, args.gpu_batch_per_worker, min_micro_batch=8)
        report = build_report(sweep, rows, env, complete)
        from cluster.bench.plots import write_plots

        report.images = write_plots(rows, sweep.out, env, {**sweep.settings(),
                                                           "gpu_batch_per_worker": args.gpu_batch_per_worker})
        for path in report.write():
            say.line(f"wrote {path}")
    finally:
        say.close()
        if sweep.own_scratch:
            shutil.rmtree(sweep.scratch, ignore_errors=True)
    return 0 if complete else 130


class _Say:
    """A progress bar across the sweep on a terminal; one line per finished configuration."""

    def __init__(self, total: int, done: int):
        from tqdm import tqdm

        self.stream = os.fdopen(os.dup(2), "w", buffering=1)  # survives output_to's redirection
        self.bar = tqdm(total=total, initial=done, desc="sweep", unit="config", file=self.stream,
                        dynamic_ncols=True) if self.stream.isatty() else None
        self.total, self.count = total, done

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def start(self, spec: Spec) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(spec.label)

    def finish(self, spec: Spec, row: dict[str, Any]) -> None:
        self.count += 1
        text = f"[{self.count}/{self.total}] {spec.label}: "
        if row.get("status") != "ok":
            text += "FAILED: " + (row.get("error") or "").strip().splitlines()[-1][:200]
        elif spec.kind == "calibration":
            text += row["skipped"] if row.get("skipped") else f"profile at micro-batches {row.get('micro_batch_sizes')}"
        else:
            text += f"{row['images_per_s']:.1f} img/s, step p50 {1000 * row['step_p50_s']:.0f} ms"
            if "predicted_images_per_s" in row:
                text += f" (predicted {row['predicted_images_per_s']:.1f}, {100 * row['prediction_error']:+.0f}%)"
        text += f" [{row.get('wall_s', 0):.0f} s]"
        self.line(text)
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.stream.close()


if __name__ == "__main__":
    sys.exit(main())
