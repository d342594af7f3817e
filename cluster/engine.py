"""One rank of a P × T × D job: DeepSpeed's PipelineEngine over this rank's share of AlexNet.

`PipelineWorker(cfg).run()` is called on every rank after torch.distributed is initialised (by Ray
Train's TorchTrainer, or by `cluster.spawn` in tests and benchmarks). It builds the same model as
the single-process trainer (same seed, same init), keeps this rank's stage / tower, trains with the
paper's optimiser and schedule, evaluates, checkpoints, resumes, and times every pipeline
instruction so the bubble can be measured.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional, Protocol

import torch
import torch.distributed as dist

from alexnet_pp.config import RunConfig
from alexnet_pp.deferred_grads import DeferredGrads
from alexnet_pp.host import configure_host
from alexnet_pp.model import AlexNet
from alexnet_pp.optim import LRSchedule, build_optimizer
from alexnet_pp.pipeline import Partition, describe, measure_layer_costs, partition, unit_names
from alexnet_pp.trainer import eval_interval, total_steps
from cluster.checkpoint import CheckpointStore, tag_for
from cluster.device_feed import pinned, prefetch_to_device
from cluster.stage_layers import GroupRef, eval_stats, mark_norm_ownership, pipeline_loss, stage_layers
from cluster.topology import Coord, Topology, build_topology

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


class WorkerError(RuntimeError):
    """An exception on a rank, with the rank's place in the job in its message."""


class TrainData(Protocol):
    """What the first pipeline stage reads. Replicas must agree on steps per epoch."""

    def micro_batches_per_epoch(self) -> int: ...

    def epoch(self, epoch: int) -> Iterator[Batch]: ...

    def eval_batches(self) -> Iterator[Batch]: ...

    def eval_batch_count(self) -> int: ...

    def skip_counts(self) -> dict[str, int]: ...


class ShardData:
    """The WebDataset stream of one data-parallel replica (alexnet_pp.data)."""

    def __init__(self, cfg: RunConfig, replica: int, replicas: int, micro_batch: int):
        from alexnet_pp.data import build_eval_loader, build_train_loader

        self.cfg, self.replica, self.replicas, self.micro_batch = cfg, replica, replicas, micro_batch
        self._train, self._eval = build_train_loader, build_eval_loader
        self._current = None
        self._eval_batches: Optional[int] = None
        self._len = len(build_train_loader(cfg, replica=replica, num_replicas=replicas, epoch=0, micro_batch=micro_batch))

    def micro_batches_per_epoch(self) -> int:
        return self._len

    def epoch(self, epoch: int) -> Iterator[Batch]:
        self._current = self._train(self.cfg, replica=self.replica, num_replicas=self.replicas, epoch=epoch,
                                    micro_batch=self.micro_batch)
        for images, labels, *_ in self._current:
            yield images, labels

    def eval_batches(self) -> Iterator[Batch]:
        loader = self._eval(self.cfg, replica=self.replica, num_replicas=self.replicas)
        for images, labels, *_ in loader:
            yield images, labels

    def eval_batch_count(self) -> int:
        if self._eval_batches is None:  # the split does not change during a run: look it up once
            from alexnet_pp.data import ensure_dataset

            per_replica = math.ceil(ensure_dataset(self.cfg).val_samples / self.replicas)
            self._eval_batches = max(1, math.ceil(per_replica / self.micro_batch))
        return self._eval_batches

    def skip_counts(self) -> dict[str, int]:
        counts = getattr(self._current, "skip_counts", None)
        return dict(counts()) if callable(counts) else {}


class TensorData:
    """Fixed in-memory global batches, split like the trainer would: replica r, micro-batch m of a step
    gets rows [(r·M + m)·mb, (r·M + m + 1)·mb) of the step's global batch (tests and benchmarks)."""

    def __init__(self, batches: list[Batch], replica: int, replicas: int, micro_batches: int):
        if torch.cuda.is_available():  # as a pin_memory DataLoader would hand them over
            batches = [(pinned(x), pinned(y)) for x, y in batches]
        self.batches, self.replica, self.replicas, self.m = batches, replica, replicas, micro_batches

    def _split(self, images: torch.Tensor, labels: torch.Tensor) -> Iterator[Batch]:
        mb = labels.shape[0] // (self.replicas * self.m)
        for m in range(self.m):
            lo = (self.replica * self.m + m) * mb
            yield images[lo : lo + mb], labels[lo : lo + mb]

    def micro_batches_per_epoch(self) -> int:
        return len(self.batches) * self.m

    def epoch(self, epoch: int) -> Iterator[Batch]:
        for images, labels in self.batches:
            yield from self._split(images, labels)

    def eval_batches(self) -> Iterator[Batch]:
        return self.epoch(0)

    def eval_batch_count(self) -> int:
        return self.micro_batches_per_epoch()

    def skip_counts(self) -> dict[str, int]:
        return {}


# --- timing: every pipeline instruction, so the bubble is measured, not guessed ---------------

PHASES = {
    "ForwardPass": "forward",
    "BackwardPass": "backward",
    "LoadMicroBatch": "data_wait",
    "SendActivation": "send",
    "SendGrad": "send",
    "RecvActivation": "recv",
    "RecvGrad": "recv",
    "ReduceGrads": "optimizer",
    "ReduceTiedGrads": "optimizer",
    "OptimizerStep": "optimizer",
}


class InstructionTimer:
    """Wraps the engine's instruction table (an instance copy; DeepSpeed's class stays untouched).
    `before` runs extra work ahead of an instruction, timed under its own phase: name → (fn, phase)."""

    def __init__(self, engine, before: Optional[dict[str, tuple[Callable[[], None], str]]] = None) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        table = dict(type(engine)._INSTRUCTION_MAP)
        for cmd_type, fn in list(table.items()):
            timed = self._timed(fn, PHASES.get(cmd_type.__name__, "other"))
            if before and cmd_type.__name__ in before:
                timed = self._preceded(timed, *before[cmd_type.__name__])
            table[cmd_type] = timed
        engine._INSTRUCTION_MAP = table

    def _preceded(self, run: Callable, extra: Callable[[], None], phase: str) -> Callable:
        def both(engine, **kwargs):
            t0 = time.perf_counter()
            try:
                extra()
            finally:
                self.seconds[phase] += time.perf_counter() - t0
            return run(engine, **kwargs)

        return both

    def _timed(self, fn: Callable, phase: str) -> Callable:
        def run(engine, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(engine, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - t0

        return run

    def take(self) -> dict[str, float]:
        out = dict(self.seconds)
        self.seconds.clear()
        return out


@dataclass
class StepStats:
    step: int
    epoch: int
    loss: float
    lr: float
    images: int  # images in this optimizer step, whole job
    seconds: float
    phases: dict[str, float]
    bubble: float  # this rank's idle share of the pipeline schedule (excluding the optimizer step)
    theoretical_bubble: float


@dataclass
class WorkerResult:
    coord: dict[str, int]
    steps: int
    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    stats: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: Optional[int] = None
    skip_counts: dict[str, int] = field(default_factory=dict)
    parameters: Optional[dict[str, torch.Tensor]] = None


def deepspeed_config(cfg: RunConfig, topo: Topology) -> dict[str, Any]:
    p = cfg.parallel
    ds: dict[str, Any] = {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": topo.micro_batch,
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
        data: Optional[TrainData] = None,
        on_step: Optional[Callable[[StepStats, Coord], None]] = None,
        on_eval: Optional[Callable[[dict[str, float], Coord], None]] = None,
        keep_parameters: bool = False,
    ):
        self.cfg = cfg
        self.topo = build_topology(cfg)
        self.rank = dist.get_rank()
        if dist.get_world_size() != self.topo.world_size:
            raise WorkerError(f"world size {dist.get_world_size()} ≠ pp × tp × dp = {self.topo.world_size}")
        self.coord = self.topo.coord(self.rank)
        self.data = data
        self.on_step, self.on_eval = on_step, on_eval
        self.keep_parameters = keep_parameters

    # --- construction -------------------------------------------------------------------------

    def _build(self) -> None:
        import deepspeed
        from deepspeed.pipe import PipelineModule
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        cfg, topo, c = self.cfg, self.topo, self.coord
        # DeepSpeed keeps its own handle on the process group the launcher already made.
        deepspeed.init_distributed(dist_backend=dist.get_backend(),
                                   timeout=timedelta(seconds=cfg.parallel.collective_timeout_s))
        configure_host(cfg.train.threads, cfg.train.keep_freed_memory)
        ckpt_dir = cfg.checkpoint.dir or str(cfg.run_dir / "checkpoints")
        self.store = CheckpointStore(ckpt_dir, cfg.checkpoint.keep)
        self.layer_costs = None
        resumed_bounds = self._checkpoint_bounds()
        if resumed_bounds is not None:  # a restart keeps the cuts its checkpoint's layer files were written with
            self.topo = topo = replace(topo, partition=Partition(resumed_bounds, topo.partition.method))
        elif cfg.parallel.partition.strip() == "measured":
            self.layer_costs = self._measured_costs()
            self.topo = topo = replace(topo, partition=partition(cfg.model, topo.pp, "measured", self.layer_costs,
                                                                 tp=topo.tp))
        torch.manual_seed(cfg.train.seed)  # the same initial weights as the single-process trainer
        model = AlexNet(cfg.model)
        self.group = GroupRef()
        layers, bounds = stage_layers(model, topo.tp, c.tower, self.group, cfg.train.seed, c.replica,
                                      topo.partition.bounds)
        bounds = list(bounds)
        # FC weight gradients once per step; DeepSpeed's bf16 and ZeRO optimizers read gradients per micro-batch
        self.deferred = DeferredGrads(layers) if self.deferred_active() else None

        class AlexNetPipe(PipelineModule):
            def _partition_layers(self, method="uniform"):  # our cut points, not DeepSpeed's methods
                self.parts = bounds
                stage = self._topo.get_coord(self.global_rank).pipe
                self._set_bounds(start=bounds[stage], stop=bounds[stage + 1])

        ds_topo = PipeModelDataParallelTopology(num_pp=topo.pp, num_mp=topo.tp, num_dp=topo.dp)
        self.module = AlexNetPipe(
            layers=layers,
            topology=ds_topo,
            loss_fn=pipeline_loss,
            activation_checkpoint_interval=cfg.parallel.activation_checkpoint_interval,
        )
        del model, layers
        self.group.group = self.module._grid.get_slice_parallel_group()
        mark_norm_ownership(self.module, topo.tp, c.tower)
        optimizer = build_optimizer(self.module.parameters(), cfg.train)
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.module, optimizer=optimizer, config=deepspeed_config(cfg, topo)
        )
        # weight gradients are backward work: flushed just before DeepSpeed reduces and clips them
        self.timer = InstructionTimer(self.engine, before={"ReduceGrads": (self.deferred.flush, "backward")}
                                      if self.deferred else None)
        if self.data is None and c.stage == 0:
            self.data = ShardData(cfg, c.replica, topo.dp, topo.micro_batch)
        self.steps_per_epoch = self._steps_per_epoch()
        self.total_steps = total_steps(cfg, self.steps_per_epoch)
        self.optimizer = optimizer
        self.schedule = LRSchedule(optimizer, cfg.train, self.steps_per_epoch, self.total_steps)
        if self.rank == 0:
            log.info("%s", describe(cfg.model, topo.partition, self.layer_costs if topo.pp > 1 else None, topo.tp))

    def _checkpoint_bounds(self) -> Optional[tuple[int, ...]]:
        """The stage cuts of the checkpoint this run will resume from, if any. Measured cuts can differ
        from one start to the next; an explicit method that now cuts differently is an error."""
        latest = self.store.latest() if self.cfg.checkpoint.resume else None
        if latest is None or "bounds" not in latest[2]:
            return None
        units = list(unit_names(self.topo.tp))
        if latest[2].get("units", units) != units:
            raise WorkerError(
                f"checkpoint {self.store.root / latest[1]} holds pipeline units {latest[2]['units']}, but this "
                f"layout runs {units}; resume with the layout that wrote it or use another checkpoint.dir")
        bounds = tuple(latest[2]["bounds"])
        if len(bounds) != self.topo.pp + 1:
            return None  # another layout: resume() says what is wrong
        method = self.cfg.parallel.partition.strip()
        if method != "measured" and bounds != self.topo.partition.bounds:
            raise WorkerError(
                f"checkpoint {self.store.root / latest[1]} cut the pipeline at {list(bounds)}, but "
                f"parallel.partition={method!r} now cuts at {list(self.topo.partition.bounds)}; resume with "
                f"--parallel.partition {','.join(map(str, bounds[1:-1]))} or use another checkpoint.dir")
        return bounds

    def deferred_active(self) -> bool:
        p = self.cfg.parallel
        return p.defer_weight_grads and p.precision == "fp32" and p.zero_stage == 0

    def _measured_costs(self) -> list[float]:
        """Rank 0 times every layer on its device; all ranks cut the pipeline from the same numbers."""
        box: list[Any] = [None]
        if self.rank == 0 and self.topo.pp > 1:
            device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
            box = [measure_layer_costs(self.cfg.model, self.topo.micro_batch, device, tp=self.topo.tp,
                                       defer_weight_grads=self.deferred_active())]
        if self.topo.pp == 1:
            return [1.0] * len(unit_names(self.topo.tp))  # nothing to cut
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _steps_per_epoch(self) -> int:
        # Only first-stage ranks hold data; they tell everyone (the minimum, so no replica runs dry).
        local = self.data.micro_batches_per_epoch() // self.topo.micro_batches if self.coord.stage == 0 else 10**12
        t = torch.tensor([local], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        steps = int(t.item())
        if steps < 1:
            raise WorkerError(
                f"{self.coord.label()}: the data gives fewer than one step per epoch "
                f"({self.topo.micro_batches} micro-batches of {self.topo.micro_batch} per replica needed)"
            )
        return steps

    # --- data iterators in the shape DeepSpeed's PipelineEngine pulls them -----------------------

    def _train_iter(self, epoch: int, skip_steps: int) -> Iterator:
        if self.coord.stage != 0:
            return itertools.repeat((None, None))  # last stage: labels arrive with the activations
        stream = self.data.epoch(epoch)
        for _ in range(skip_steps * self.topo.micro_batches):  # resume mid-epoch on the same stream
            next(stream)
        stream = prefetch_to_device(stream, self.engine.device)
        return (((images, labels), labels) for images, labels in stream)

    # --- checkpoints -----------------------------------------------------------------------------

    def save(self, step: int, epoch: int, step_in_epoch: int) -> None:
        t0 = time.perf_counter()
        tag = tag_for(step)
        position = {"step": step, "epoch": epoch, "step_in_epoch": step_in_epoch}
        client = {"position": position, "schedule": self.schedule.state_dict()}
        self.engine.save_checkpoint(str(self.store.root), tag=tag, client_state=client, save_latest=False)
        torch.save({"torch_rng": torch.get_rng_state(), "modules": self._generator_states()},
                   self.store.rank_state_path(tag, self.rank))
        dist.barrier()
        if self.rank == 0:
            self.store.mark_complete(tag, {**position, "world": self.topo.world_size,
                                           "layout": [self.topo.pp, self.topo.tp, self.topo.dp],
                                           "bounds": list(self.topo.partition.bounds),
                                           "units": list(unit_names(self.topo.tp))})
            self.store.prune()
        dist.barrier()
        self.last_checkpoint_seconds = time.perf_counter() - t0

    def _generator_states(self) -> list[Optional[torch.Tensor]]:
        return [getattr(m, "generator", None).get_state() if getattr(m, "generator", None) is not None else None
                for m in self.module.forward_funcs]

    def resume(self) -> Optional[dict[str, int]]:
        if not self.cfg.checkpoint.resume:
            return None
        latest = self.store.latest()
        if latest is None:
            return None
        step, tag, info = latest
        if info.get("layout") not in (None, [self.topo.pp, self.topo.tp, self.topo.dp]):
            raise WorkerError(
                f"checkpoint {self.store.root / tag} was written by layout (P, T, D) = {tuple(info['layout'])}; "
                f"this job is {(self.topo.pp, self.topo.tp, self.topo.dp)}. Use the same layout or another "
                "checkpoint.dir"
            )
        _, client = self.engine.load_checkpoint(str(self.store.root), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        self.schedule.load_state_dict(client["schedule"])
        state = torch.load(self.store.rank_state_path(tag, self.rank), weights_only=False)
        torch.set_rng_state(state["torch_rng"])
        for m, g in zip(self.module.forward_funcs, state["modules"]):
            if g is not None:
                m.generator.set_state(g)
        return client["position"]

    # --- evaluation ------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        engine = self.engine
        engine.reset_activation_shape()
        n = self._eval_batches_needed()
        engine.module.loss_fn = eval_stats
        engine.total_loss = None  # eval_batch accumulates into what train_batch left there
        try:
            it = self._eval_iter(n) if self.coord.stage == 0 else itertools.repeat((None, None))
            out = engine.eval_batch(it, compute_loss=True, bcast_loss=False, num_micro_batches=n)
        finally:
            engine.module.loss_fn = pipeline_loss
            engine.reset_activation_shape()
        # eval_batch averaged the sums over micro-batches and replicas; undo that, then share.
        totals = torch.zeros(4)
        if engine.is_last_stage() and self.coord.tower == 0 and self.coord.replica == 0:
            totals = out.float().cpu() * n * self.topo.dp
        dist.all_reduce(totals)
        loss, h1, h5, count = totals.tolist()
        count = max(count, 1.0)
        return {"top1": h1 / count, "top5": h5 / count, "val_loss": loss / count, "val_samples": int(totals[3])}

    def _eval_batches_needed(self) -> int:
        local = self.data.eval_batch_count() if self.coord.stage == 0 else 0
        t = torch.tensor([local], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _eval_iter(self, n: int) -> Iterator:
        """Exactly n micro-batches of exactly micro_batch rows: short batches are padded with label −1."""
        mb = self.topo.micro_batch
        template = None
        produced = 0
        for images, labels in self.data.eval_batches():
            for lo in range(0, labels.shape[0], mb):
                x, y = images[lo : lo + mb], labels[lo : lo + mb]
                template = x
                if y.shape[0] < mb:
                    pad = mb - y.shape[0]
                    x = torch.cat([x, x[:1].expand(pad, *x.shape[1:])])
                    y = torch.cat([y, torch.full((pad,), -1, dtype=y.dtype)])
                produced += 1
                yield (x, y), y
        while produced < n:  # this replica's share ran out first
            x = torch.zeros(mb, *template.shape[1:]) if template is not None else self._blank_eval_images()
            y = torch.full((mb,), -1, dtype=torch.long)
            produced += 1
            yield (x, y), y

    def _blank_eval_images(self) -> torch.Tensor:
        s = self.cfg.model.image_size
        shape = (self.topo.micro_batch, 10, 3, s, s) if self.cfg.data.eval_crops == 10 else (self.topo.micro_batch, 3, s, s)
        return torch.zeros(shape)

    # --- training --------------------------------------------------------------------------------

    def run(self) -> WorkerResult:
        try:
            return self._run()
        except WorkerError:
            raise
        except Exception as e:  # the driver must see where it happened
            raise WorkerError(f"{self.coord.label()}: {type(e).__name__}: {e}") from e

    def _run(self) -> WorkerResult:
        self._build()
        cfg, topo = self.cfg, self.topo
        result = WorkerResult(coord=asdict(self.coord), steps=0)
        position = self.resume()
        step, epoch, in_epoch = 0, 0, 0
        if position is not None:
            step, epoch, in_epoch = position["step"], position["epoch"], position["step_in_epoch"]
            result.resumed_from = step
        if in_epoch >= self.steps_per_epoch:
            epoch, in_epoch = epoch + 1, 0
        eval_every = eval_interval(cfg, self.steps_per_epoch)
        ckpt_every = cfg.checkpoint.every_steps
        images_per_step = cfg.train.batch_size
        theory = topo.theoretical_bubble()
        while step < self.total_steps:
            it = self._train_iter(epoch, in_epoch)
            while in_epoch < self.steps_per_epoch and step < self.total_steps:
                self.timer.take()
                t0 = time.perf_counter()
                loss = float(self.engine.train_batch(it))
                seconds = time.perf_counter() - t0
                step, in_epoch = step + 1, in_epoch + 1
                self.schedule.after_step(step)
                phases = self.timer.take()
                pipe_time = seconds - phases.get("optimizer", 0.0)
                busy = phases.get("forward", 0.0) + phases.get("backward", 0.0) + phases.get("data_wait", 0.0)
                phases["idle"] = max(0.0, pipe_time - busy)
                stats = StepStats(step, epoch, loss, self.schedule.lr, images_per_step, seconds, phases,
                                  phases["idle"] / pipe_time if pipe_time > 0 else 0.0, theory)
                result.losses.append(loss)
                result.stats.append(asdict(stats))
                if self.on_step:
                    self.on_step(stats, self.coord)
                if step % eval_every == 0 or step == self.total_steps:
                    metrics = {"step": step, **self.evaluate()}
                    self.schedule.after_eval(metrics["top1"])
                    result.evals.append(metrics)
                    if self.on_eval:
                        self.on_eval(metrics, self.coord)
                if (ckpt_every and step % ckpt_every == 0) or step == self.total_steps:
                    self.save(step, epoch, in_epoch)
            if in_epoch >= self.steps_per_epoch:
                epoch, in_epoch = epoch + 1, 0
        result.steps = step
        if self.data is not None:
            result.skip_counts = self.data.skip_counts()
        if self.keep_parameters:
            result.parameters = {key: p.detach().clone() for layer in self.module.forward_funcs
                                 for key, p in layer.model_parameters()}
        return result


def init_process_group_from_env(timeout_s: float) -> None:
    """For launchers other than Ray Train (which initialises torch.distributed itself)."""
    if not dist.is_initialized():
        # gloo beside nccl: the CPU-side step counts and eval tallies are all-reduced as CPU tensors
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
