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
from cluster.bench.report import environment, load_average
from cluster.bench.scaling_report import build_report
from cluster.bench.scaling_rows import combine_runs, derive, gpu_predictions, with_prediction, with_predictions

KINDS = ("calibration", "plain", "ddp", "engine", "ds-default")
BASELINES = ("plain", "ddp", "ds-default")


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
        self.cpu_ratios: dict[str, Optional[float]] = {}  # compute_cpu_ratio, by row id

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


def _finite(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


# --- files: rows as they finish, for a resumed sweep ---------------------------------------------

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
        sweep.cpu_ratios.clear()  # from here on every run's calibration pools all of the sweep's
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
