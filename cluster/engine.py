"""One rank of a P × T × D job: DeepSpeed's PipelineEngine over this rank's share of AlexNet.

`PipelineWorker(cfg, layout).run()` is called on every rank after torch.distributed is initialised
(by Ray Train's TorchTrainer, or by `cluster.spawn` in tests and benchmarks). It builds only this
rank's stage and tower (the same initial weights the single-process trainer's network has), trains
with the paper's optimiser and schedule, evaluates, checkpoints and resumes (cluster/checkpoint.py),
times every pipeline instruction (cluster/timing.py) and tells its callbacks (cluster/callbacks.py).
What it reads comes from cluster/feeds.py.
"""

from __future__ import annotations

import gc
import logging
import math
import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist

from alexnet_pp.config import RunConfig
from alexnet_pp.deferred_grads import DeferredGrads
from alexnet_pp.host import busy_cpu_seconds, configure_host
from alexnet_pp.layout import Layout
from alexnet_pp.optim import LRSchedule, build_optimizer
from alexnet_pp.pipeline import Partition, describe, measure_layer_costs, partition
from alexnet_pp.summary import trials_text
from alexnet_pp.trainer import eval_interval, total_steps
from cluster.callbacks import Callback, Callbacks
from cluster.checkpoint import EngineCheckpoints
from cluster.faults import CheckpointWriteGuard, InstructionWatchdog, NonFiniteWatch, StopRun, timed_out, where
from cluster.feeds import ShardData, TrainData, eval_micro_batches, no_data, train_micro_batches
from cluster.jit_builds import pin_extension_builds
from cluster.replica_grads import FlatReplicaGrads
from cluster.stage_layers import GroupRef, eval_stats, mark_norm_ownership, pipeline_loss, rank_layers
from cluster.stage_cut import live_costs, settle_cut
from cluster.timing import InstructionTimer, peak_memory_bytes, reset_peak_memory, step_stats

log = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """An exception on a rank, with the rank's place in the job in its message."""


@dataclass
class RankResult:
    """What one rank saw: the raw material of the run's RunSummary (cluster/run_summary.py)."""

    coord: dict[str, int]
    steps: int
    host: str = field(default_factory=socket.gethostname)  # the machine it ran on: its ranks share its cores
    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    stats: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: Optional[int] = None
    resumed_layout: Optional[tuple[int, int, int]] = None  # the (P, T, D) that wrote the resumed checkpoint
    stopped: Optional[str] = None  # why the job stopped early on every rank (cluster/faults.py: StopRun)
    skip_counts: dict[str, int] = field(default_factory=dict)
    parameters: Optional[dict[str, torch.Tensor]] = None
    timeline: list[dict[str, Any]] = field(default_factory=list)  # the last step's instructions (timing.InstructionEvent)
    peak_memory: int = 0  # bytes while training: CUDA's peak allocation, else the process's peak resident set
    bounds: tuple[int, ...] = ()  # the stage cut it trained on (pipeline units, alexnet_pp/pipeline.py)
    cut: str = ""  # that cut as a parallel.partition value (with the channels of a split unit: Partition)
    cut_trials: dict[str, list[float]] = field(default_factory=dict)  # live check: cut → each stage's s per micro-batch


def eval_totals(averaged: torch.Tensor, parts: int) -> torch.Tensor:
    """[loss sum, top-1 hits, top-5 hits, samples] from eval_batch's output, which DeepSpeed averaged
    over `parts` (micro-batches × replicas): undone in float64, where the products stay exact."""
    return averaged.double().cpu() * parts


def eval_metrics(totals: torch.Tensor) -> dict[str, float]:
    loss, h1, h5, count = totals.tolist()
    h1, h5, samples = round(h1), round(h5), round(count)  # counts: a float a hair off must not lose one
    count = max(samples, 1)
    return {"top1": h1 / count, "top5": h5 / count, "val_loss": loss / count, "val_samples": samples}


def deepspeed_config(cfg: RunConfig, layout: Layout) -> dict[str, Any]:
    p = cfg.parallel
    ds: dict[str, Any] = {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": p.micro_batches,
        "gradient_clipping": cfg.train.grad_clip,
        "steps_per_print": 10**9,  # progress is ours
        "wall_clock_breakdown": False,
        # Tower halves travel whole between stages; DeepSpeed's partitioning assumes Megatron shapes.
        "pipeline": {"pipe_partitioned": False, "grad_partitioned": False},
        "zero_optimization": {"stage": p.zero_stage},
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"load_universal": False},
    }
    if p.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif p.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 12}
    return ds


class PipelineWorker:
    def __init__(
        self,
        cfg: RunConfig,
        layout: Layout,
        data: Optional[TrainData] = None,
        callbacks: Iterable[Callback] = (),
        keep_parameters: bool = False,
    ):
        self.cfg, self.layout = cfg, layout
        self.rank = dist.get_rank()
        if dist.get_world_size() != layout.world_size:
            raise WorkerError(f"world size {dist.get_world_size()} ≠ pp × tp × dp = {layout.world_size}")
        self.coord = layout.coord(self.rank)
        self.data = data
        self.callbacks = Callbacks(callbacks)
        self.keep_parameters = keep_parameters

    # --- construction -------------------------------------------------------------------------

    def _build(self) -> None:
        pin_extension_builds()  # before DeepSpeed builds or loads its comm op
        import deepspeed

        cfg, c = self.cfg, self.coord
        # DeepSpeed keeps its own handle on the process group the launcher already made.
        deepspeed.init_distributed(dist_backend=dist.get_backend(),
                                   timeout=timedelta(seconds=cfg.parallel.collective_timeout_s))
        configure_host(cfg.train.threads, cfg.train.keep_freed_memory)
        self.layer_costs = None
        self.cut_trials: dict[str, list[float]] = {}
        if cfg.parallel.partition.strip() == "measured" and self.layout.pp > 1:
            self.layer_costs = self._measured_costs()
            cut = partition(cfg.model, self.layout.pp, "measured", self.layer_costs, tp=self.layout.tp)
            self.layout = self.layout.with_cut(cut)
        self._build_engine()
        if self.layer_costs is not None:
            self._settle_cut()
        layout = self.layout
        # faults (cluster/faults.py): which layer went non-finite first; which instruction a rank is stuck in
        self.non_finite = NonFiniteWatch(self.module.forward_funcs, c, self.engine.device)
        self.watchdog = InstructionWatchdog(self.timer, c, cfg.parallel.collective_timeout_s,
                                            lambda record: self.callbacks.on_stuck(record, self.coord)).start()
        if self.data is None and c.stage == 0:
            self.data = ShardData(cfg, layout, c.replica, self.engine.device)
        self.steps_per_epoch = self._steps_per_epoch()
        self.total_steps = total_steps(cfg, self.steps_per_epoch)
        self.schedule = LRSchedule(self.optimizer, cfg.train, self.steps_per_epoch, self.total_steps)
        if self.rank == 0:
            log.info("%s", describe(cfg.model, layout.partition, self.layer_costs, layout.tp))

    def _build_engine(self) -> None:
        """This rank's stage of `self.layout` inside DeepSpeed's engine, with its optimizer and timer."""
        import deepspeed
        from deepspeed.pipe import PipelineModule
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        # imports deepspeed: inside the worker
        from cluster.zero_bubble import ZeroBubbleEngine, defers_weight_grads

        cfg, c, layout = self.cfg, self.coord, self.layout
        self.checkpoints = EngineCheckpoints(cfg, layout, self.rank)
        self.group = GroupRef()
        specs, bounds = rank_layers(cfg.model, layout.tp, c.tower, self.group, cfg.train.seed,
                                    layout.partition, cfg.parallel.channels_last,
                                    torch.bfloat16 if cfg.parallel.precision == "bf16-mixed" else None)
        bounds = list(bounds)

        class AlexNetPipe(PipelineModule):
            def _partition_layers(self, method="uniform"):  # our cut points, not DeepSpeed's methods
                self.parts = bounds
                stage = self._topo.get_coord(self.global_rank).pipe
                self._set_bounds(start=bounds[stage], stop=bounds[stage + 1])

        self.module = AlexNetPipe(
            layers=specs,  # LayerSpecs: only this stage's are built
            topology=PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp),
            loss_fn=pipeline_loss,
            activation_checkpoint_interval=cfg.parallel.activation_checkpoint_interval,
        )
        self.group.group = self.module._grid.get_slice_parallel_group()
        mark_norm_ownership(self.module, layout.tp, c.tower)
        self.checkpoints.load_weights(self.module)  # before DeepSpeed copies them (bf16 master weights)
        zero_bubble = cfg.parallel.schedule == "zb-h1"
        # FC weight gradients once per step; DeepSpeed's bf16 and ZeRO optimizers read gradients per micro-batch.
        # zb-h1: every conv and linear weight gradient in its micro-batch's W pass (cluster/zero_bubble.py)
        if zero_bubble:  # a stage that never delays a W (the first) defers nothing: whole backward passes
            defers = defers_weight_grads(layout.pp, layout.micro_batches, c.stage)
            self.deferred = DeferredGrads(list(self.module.forward_funcs) if defers else [], convolutions=True)
        else:
            self.deferred = DeferredGrads(list(self.module.forward_funcs)) if self.deferred_active() else None
        self.optimizer = build_optimizer(self.module.parameters(), cfg.train)
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.module, optimizer=self.optimizer, config=deepspeed_config(cfg, layout)
        )
        if zero_bubble:
            ZeroBubbleEngine.adopt(self.engine, self.deferred)
        # float32: the replicas average the gradients where they lie, without DeepSpeed's copies
        dp_group = self.engine.mpu.get_data_parallel_group()
        replicas = dist.get_world_size(dp_group)
        if cfg.parallel.flat_grads and FlatReplicaGrads.applies(self.engine):
            FlatReplicaGrads.adopt(self.engine, dp_group, replicas)
        elif self.engine.using_bf16_optimizer and replicas == 1:
            # one replica: DeepSpeed's bf16 reduce still flattens every gradient, "averages" it over one
            # rank and copies it back, ~0.6 ms of host time and two copies a step on a GPU for nothing
            self.engine._bf16_reduce_grads = lambda: None
        # weight gradients are backward work: flushed just before DeepSpeed reduces and clips them
        self.timer = InstructionTimer(self.engine, before={"ReduceGrads": (self.deferred.flush, "backward")}
                                      if self.deferred and not zero_bubble else None)

    def _settle_cut(self) -> None:
        """Check the measured cut on the engine's live stage times and re-cut (cluster/stage_cut.py)."""
        cfg, layout = self.cfg, self.layout

        def measure() -> list[float]:
            # 1F1B's deferred FC weight gradients are stage work at the step's end; zb-h1's W passes are
            # instructions of its schedule
            step_end = self.deferred.flush if self.deferred is not None and cfg.parallel.schedule == "1f1b" else None
            live = live_costs(self.engine, self.timer, self.module, cfg.model, layout.micro_batch, self.coord.stage,
                              layout.pp, cfg.train.seed, step_end=step_end)
            if self.deferred is not None:  # no kept row may join the first step's gradients
                self.deferred.discard()
            return live

        def rebuild(cut: Partition) -> None:
            self.engine = self.module = self.optimizer = self.deferred = self.timer = None
            gc.collect()
            self.layout = self.layout.with_cut(cut)
            self._build_engine()

        _, tried = settle_cut(cfg.model, self.layer_costs, layout.partition, layout.tp, measure, rebuild)
        self.cut_trials = {c.cut_points(layout.tp): live for c, live in tried.items()}
        if self.rank == 0:
            log.info("pipeline cut on live stage times (ms per micro-batch per stage): %s; training on %s",
                     trials_text(self.cut_trials), self.layout.partition.cut_points(layout.tp))

    def deferred_active(self) -> bool:
        p = self.cfg.parallel
        return p.defer_weight_grads and p.precision == "fp32" and p.zero_stage == 0

    def _measured_costs(self) -> list[float]:
        """Rank 0 times every pipeline unit on its device; all ranks cut the pipeline from the same numbers."""
        box: list[Any] = [None]
        if self.rank == 0:
            device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
            box = [measure_layer_costs(self.cfg.model, self.layout.micro_batch, device, tp=self.layout.tp,
                                       defer_weight_grads=self.deferred_active())]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _steps_per_epoch(self) -> int:
        # Only first-stage ranks hold data; they tell everyone (the minimum, so no replica runs dry).
        m = self.layout.micro_batches
        local = self.data.micro_batches_per_epoch() // m if self.coord.stage == 0 else 10**12
        t = torch.tensor([local], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        steps = int(t.item())
        if steps < 1:
            raise WorkerError(
                f"{self.coord.label()}: the data gives fewer than one step per epoch "
                f"({m} micro-batches of {self.layout.micro_batch} per replica needed)"
            )
        return steps

    # --- evaluation ------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        engine = self.engine
        engine.reset_activation_shape()
        self.timer.step = None  # instructions from here on belong to the evaluation
        n = self._eval_batches_needed()
        engine.module.loss_fn = eval_stats
        engine.total_loss = None  # eval_batch accumulates into what train_batch left there
        try:
            it = eval_micro_batches(self.data, self.layout, n, self._blank_eval_images()) \
                if self.coord.stage == 0 else no_data()
            out = engine.eval_batch(it, compute_loss=True, bcast_loss=False, num_micro_batches=n)
        finally:
            engine.module.loss_fn = pipeline_loss
            engine.reset_activation_shape()
        totals = torch.zeros(4, dtype=torch.float64)
        if engine.is_last_stage() and self.coord.tower == 0 and self.coord.replica == 0:
            totals = eval_totals(out, n * self.layout.dp)
        dist.all_reduce(totals)
        return eval_metrics(totals)

    def _eval_batches_needed(self) -> int:
        local = self.data.eval_batch_count() if self.coord.stage == 0 else 0
        t = torch.tensor([local], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _blank_eval_images(self) -> torch.Tensor:
        s, mb = self.cfg.model.image_size, self.layout.micro_batch
        return torch.zeros((mb, 10, 3, s, s) if self.cfg.data.eval_crops == 10 else (mb, 3, s, s))

    # --- training --------------------------------------------------------------------------------

    def run(self) -> RankResult:
        try:
            return self._run()
        except WorkerError:
            raise
        except Exception as e:  # the driver must see where it happened, and in which instruction
            timer = getattr(self, "timer", None)
            place = where(timer) + ": " if timer is not None and where(timer) else ""
            text = f"{type(e).__name__}: {e}"
            if place and timed_out(text):
                timeout = self.cfg.parallel.collective_timeout_s
                text += f" (no answer within parallel.collective_timeout_s = {timeout:g} s)"
            raise WorkerError(f"{self.coord.label()}: {place}{text}") from e
        finally:
            if getattr(self, "watchdog", None) is not None:
                self.watchdog.close()

    def _train_iter(self, epoch: int, step: int, in_epoch: int):
        if self.coord.stage != 0:
            return None  # labels and dropout keys arrive with the activations
        return train_micro_batches(self.data, self.layout, self.coord.replica, self.cfg.train.seed, epoch,
                                   step, in_epoch, self.engine.device)

    def _step_inputs(self, stream, step: int):
        """What `train_batch` pulls for one step: ((images, labels, keys), labels) per micro-batch. With
        T = 2 both towers of a first stage read and decode the images; before the step runs they compare
        the samples' digests, so mismatched halves never train together."""
        if stream is None:
            return no_data()
        if self.layout.tp == 1:
            return ((batch, batch[1]) for batch, _ in stream)
        chunk = [next(stream) for _ in range(self.layout.micro_batches)]
        self._check_towers_read_alike([d for _, d in chunk], step)
        return iter([(batch, batch[1]) for batch, _ in chunk])

    def _check_towers_read_alike(self, digests: list[int], step: int) -> None:
        mine = torch.tensor(digests, dtype=torch.int64)
        both = [torch.empty_like(mine) for _ in range(self.layout.tp)]
        dist.all_gather(both, mine, group=self.group.get())
        if not all(torch.equal(both[0], other) for other in both[1:]):
            bad = next(i for i in range(len(digests)) if len({int(t[i]) for t in both}) > 1)
            raise WorkerError(
                f"{self.coord.label()}: the towers of stage 0 read different samples for step {step + 1} "
                f"(micro-batch {bad}: digests {[int(t[bad]) for t in both]}); a shard read differently on the "
                "two ranks (changed, or a transient read error). Stopped before training on mismatched halves; "
                "the last checkpoint is intact")

    def _run(self) -> RankResult:
        self._build()
        cut = self.layout.partition
        result = RankResult(coord=asdict(self.coord), steps=0, bounds=cut.bounds, cut=cut.cut_points(self.layout.tp),
                            cut_trials=self.cut_trials)
        position = self.checkpoints.load_state(self.engine, self.module, self.schedule)
        step, epoch, in_epoch = 0, 0, 0
        if position is not None:
            step, epoch, in_epoch = position["step"], position["epoch"], position["step_in_epoch"]
            result.resumed_from = result.steps = step
            if position["layout"] and position["layout"] != self.layout.shape:
                result.resumed_layout = position["layout"]
                if self.rank == 0:
                    log.warning("resuming step %d, written by layout (P, T, D) = %s, on layout %s", step,
                                position["layout"], self.layout.shape)
        if in_epoch >= self.steps_per_epoch:
            epoch, in_epoch = epoch + 1, 0
        try:
            self._train(result, step, epoch, in_epoch)
        except StopRun as e:  # raised on every rank together: end without a restart
            log.error("%s: %s", self.coord.label(), e)
            result.stopped = str(e)
        result.peak_memory = peak_memory_bytes()
        result.timeline = [asdict(e) for e in self.timer.last_step]
        if self.data is not None:
            result.skip_counts = self.data.skip_counts()
        if self.keep_parameters:
            result.parameters = {key: p.detach().clone() for layer in self.module.forward_funcs
                                 for key, p in layer.model_parameters()}
        return result

    def _train(self, result: RankResult, step: int, epoch: int, in_epoch: int) -> None:
        cfg, layout = self.cfg, self.layout
        eval_every = eval_interval(cfg, self.steps_per_epoch)
        ckpt_every = cfg.checkpoint.every_steps
        from cluster.zero_bubble import theoretical_bubble

        theory = theoretical_bubble(cfg.parallel.schedule, layout.pp, layout.micro_batches)
        reset_peak_memory()
        while step < self.total_steps:
            stream = self._train_iter(epoch, step, in_epoch)
            while in_epoch < self.steps_per_epoch and step < self.total_steps:
                self.timer.take()
                self.timer.step = step + 1
                self.non_finite.reset()
                busy0 = busy_cpu_seconds()
                t0, main0, process0 = time.perf_counter(), time.thread_time(), time.process_time()
                loss = float(self.engine.train_batch(self._step_inputs(stream, step)))
                seconds = time.perf_counter() - t0
                cpu = {"main_thread": time.thread_time() - main0, "process": time.process_time() - process0}
                busy1 = busy_cpu_seconds()
                if busy0 is not None and busy1 is not None:  # the whole machine meanwhile, the ranks included
                    cpu["host_busy"] = busy1 - busy0
                if not math.isfinite(loss):  # the same loss on every rank: all stop here together
                    raise self.non_finite.stop(step + 1, loss, self.checkpoints, layout.pp - 1)
                step, in_epoch = step + 1, in_epoch + 1
                result.steps = step
                self.schedule.after_step(step)
                phases = self.timer.take()
                stats = step_stats(step, epoch, loss, self.schedule.lr, cfg.train.batch_size, seconds,
                                   phases, theory, total_steps=self.total_steps,
                                   skip_counts=self.data.skip_counts() if self.data is not None else {}, cpu=cpu,
                                   phase_cpu=self.timer.last_cpu)
                result.losses.append(loss)
                result.stats.append(asdict(stats))
                self.callbacks.on_step(stats, self.coord)
                if step % eval_every == 0 or step == self.total_steps:
                    metrics = {"step": step, **self.evaluate()}
                    self.schedule.after_eval(metrics["top1"])
                    result.evals.append(metrics)
                    self.callbacks.on_eval(metrics, self.coord)
                if (ckpt_every and step % ckpt_every == 0) or step == self.total_steps:
                    position = {"step": step, "epoch": epoch, "step_in_epoch": in_epoch}
                    guard = CheckpointWriteGuard(self.checkpoints, step, self.coord)
                    seconds = self.checkpoints.save(self.engine, self.module, self.schedule, position, guard)
                    self.callbacks.on_checkpoint(step, seconds, self.coord)
            if in_epoch >= self.steps_per_epoch:
                epoch, in_epoch = epoch + 1, 0


def init_process_group_from_env(timeout_s: float) -> None:
    """For launchers other than Ray Train (which initialises torch.distributed itself)."""
    if not dist.is_initialized():
        dist.init_process_group(backend=process_group_backend(torch.cuda.is_available()),
                                timeout=timedelta(seconds=timeout_s))


def process_group_backend(cuda: bool) -> str:
    """gloo on CPU. With GPUs NCCL carries the CUDA tensors (pipeline p2p, tower all-gathers) and gloo
    the few CPU tensors the engine all-reduces for bookkeeping (steps per epoch, eval counts), which
    NCCL alone would reject; Ray Train accepts the combined form."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"
