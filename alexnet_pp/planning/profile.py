"""What one device of a run costs: per-unit compute times, the optimizer, links and memory.

A `DeviceProfile` is measured on the machine that will run (`measure_profile`), or written from
named public figures for a device this machine does not have (`assumed_gpu_profile`); every figure
that was not measured is named in its `assumptions`. Profiles are JSON (`save` / `load`).

Compute is kept per pipeline unit of the T = 1 network (`alexnet_pp.pipeline.unit_names(1)`) and
per kind: forward (F), input gradient (B) and weight gradient (W), each measured at two or more
micro-batch sizes n and fitted as a + b·n (a: work that does not grow with the micro-batch, such
as reading fc6's weights or launching kernels; b: per image). The first unit (conv1) computes no
input gradient in training, so its whole backward counts as W: nothing downstream waits for it.

`jitter` is how much a worker's compute time varies from one repetition to the next, as variance per
second of compute: a stretch of t seconds varies by sqrt(jitter · t) (independent pieces add their
variances). Ranks that meet at a collective wait for the slowest of them, so the cost model charges
each such meeting the expected maximum of that spread (costmodel.sync_wait).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from alexnet_pp.config import ModelConfig
from alexnet_pp.shapes import layer_macs
from alexnet_pp.pipeline import pipeline_units, unit_names

KINDS = ("forward", "backward_input", "backward_weight")


@dataclass(frozen=True)
class Link:
    """A link's α-β model: a message of b bytes takes latency + b / bandwidth seconds."""

    bandwidth: float  # bytes per second
    latency: float  # seconds per message
    # the share of a core each rank's process kept busy while it ran (CPU over wall time): on a CPU a
    # collective over loopback also waits on its peers, so ranks sharing cores stretch it only as far
    # as their CPU exceeds the cores (costmodel.tail_rate); 1 where unmeasured
    busy: float = 1.0

    def seconds(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth

    def allreduce_seconds(self, nbytes: float, ranks: int) -> float:
        """Ring all-reduce of `nbytes` per rank: 2(n − 1) steps, each moving nbytes / n."""
        if ranks <= 1:
            return 0.0
        return 2 * (ranks - 1) * self.latency + 2 * (ranks - 1) / ranks * nbytes / self.bandwidth

    def allgather_seconds(self, total_bytes: float, ranks: int) -> float:
        """Ring all-gather of a `total_bytes` result, each rank contributing total_bytes / n."""
        if ranks <= 1:
            return 0.0
        return (ranks - 1) * self.latency + (ranks - 1) / ranks * total_bytes / self.bandwidth


@dataclass
class UnitTimes:
    """One pipeline unit's seconds per micro-batch, at each of the profile's micro-batch sizes."""

    name: str
    forward: list[float]
    backward_input: list[float]
    backward_weight: list[float]


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares (a, b) of y = a + b·x; one point gives the proportional line through it."""
    if len(xs) == 1:
        return 0.0, ys[0] / xs[0]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - b * mx, b


@dataclass
class DeviceProfile:
    name: str
    device: str
    micro_batches: list[int]  # sizes the unit times were measured (or derived) at
    units: list[UnitTimes]  # the T = 1 pipeline units, in order
    optimizer_seconds_per_param: float  # the optimizer step
    p2p: Link  # point-to-point between workers on one node
    allreduce: Link  # collectives between workers on one node (ring model)
    inter_node: Optional[Link] = None  # between nodes; None: every worker on one node
    workers_per_node: int = 0  # 0: all workers on one node
    memory_bytes: Optional[int] = None  # device memory per worker
    dtype_bytes: int = 4  # float32 weights, gradients, activations
    # DeepSpeed's ReduceGrads flattens every gradient into one buffer, scales it by 1/D and copies it
    # back, whatever D: local memory traffic the engine times as part of its optimizer phase
    reduce_copy_seconds_per_param: float = 0.0
    # what the engine does instead with parallel.flat_grads (cluster/replica_grads.py): zero the
    # gradient buffer each step; scale it by 1/D after the all-reduce when D > 1
    grad_zero_seconds_per_param: float = 0.0
    grad_scale_seconds_per_param: float = 0.0
    threads: int = 0  # torch threads per worker when measured (0: not a CPU measurement)
    # a CPU's workers share its cores: while more of them compute than the cores can hold, each runs
    # slower (costmodel.compute_rate); 0: every worker computes on a device of its own
    cores: int = 0
    co_runners: int = 0  # other processes training the network while the units were timed
    # what else takes those shared cores while a run computes: the cluster's own processes (Ray's
    # daemons, the training controller), and each rank's threads beside the one that computes
    # (communication, Ray's core worker); measured on runs (cluster.bench.scaling.background_of)
    background_cores: float = 0.0
    background_cores_per_rank: float = 0.0
    # CPU seconds a unit of work costs while the machine holds more computing processes than cores,
    # over the calibration's (time_slicing_slowdown): the OS slices them, and each slice starts on
    # caches another process filled. 1: measured without, or never oversubscribed
    time_slicing_slowdown: float = 1.0
    # CPU seconds a pass's forward and backward cost inside the engine's runs on this machine over
    # what the calibration charges them (measured from runs' phase CPU: engine overhead, caches other
    # processes filled, time slicing); where known (> 0) it replaces time_slicing_slowdown at every
    # worker count. 0: unknown (a calibration alone cannot see it)
    engine_cpu_ratio: float = 0.0
    jitter: float = 0.0  # variance of compute seconds per second of compute (see the module's doc)
    model: dict = field(default_factory=dict)  # the ModelConfig fields the units were measured for
    assumptions: list[str] = field(default_factory=list)
    created: str = ""

    # --- compute ------------------------------------------------------------------------------

    def unit_seconds(self, micro_batch: int) -> list[tuple[float, float, float]]:
        """(F, B, W) seconds of each T = 1 unit at `micro_batch`: a + b·n fitted over the measured
        sizes; below the smallest measured size never less than proportional to it (small
        micro-batches do not run more efficiently)."""
        out = []
        n_min = min(self.micro_batches)
        for u in self.units:
            row = []
            for kind in KINDS:
                ys = getattr(u, kind)
                a, b = fit_line(self.micro_batches, ys)
                t = a + b * micro_batch
                if micro_batch < n_min:
                    t = max(t, ys[self.micro_batches.index(n_min)] * micro_batch / n_min)
                row.append(max(t, 0.0))
            out.append(tuple(row))
        return out

    def check_model(self, cfg: ModelConfig) -> None:
        """A profile's unit times hold for the network it was measured on only."""
        names = [u.name for u in self.units]
        if names != list(unit_names(1)):
            raise ValueError(f"profile {self.name!r} has units {names}, not the network's {list(unit_names(1))}")
        want = _model_key(cfg)
        if self.model and any(self.model.get(k) != v for k, v in want.items()):
            raise ValueError(
                f"profile {self.name!r} was measured for model {self.model}, not {want}; measure or "
                "derive a profile for this model"
            )

    # --- links --------------------------------------------------------------------------------

    def link(self, rank_a: int, rank_b: int, collective: bool = False) -> Link:
        """The link between two ranks: on one node the node's link, else the inter-node link."""
        if self.same_node(rank_a, rank_b):
            return self.allreduce if collective else self.p2p
        return self.inter_node  # type: ignore[return-value]

    def same_node(self, rank_a: int, rank_b: int) -> bool:
        if not self.workers_per_node or self.inter_node is None:
            return True
        return rank_a // self.workers_per_node == rank_b // self.workers_per_node

    # --- storage ------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DeviceProfile":
        data = dict(data)
        data["units"] = [UnitTimes(**u) for u in data["units"]]
        for key in ("p2p", "allreduce", "inter_node"):
            if data.get(key) is not None:
                data[key] = Link(**data[key])
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "DeviceProfile":
        return cls.from_dict(json.loads(Path(path).read_text()))


def mean_profile(profiles: Sequence[DeviceProfile]) -> DeviceProfile:
    """The mean of calibrations of one device taken at different moments (unit, optimizer and
    gradient-sweep times, jitter): on a machine whose speed drifts, the calibrations right before
    and right after a run bracket the speed it ran at. Links and the rest are the first's."""
    first = profiles[0]
    if len(profiles) == 1:
        return first
    for p in profiles[1:]:
        if p.micro_batches != first.micro_batches or [u.name for u in p.units] != [u.name for u in first.units]:
            raise ValueError(f"profiles {first.name!r} and {p.name!r} were measured at other sizes or units")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    units = [UnitTimes(us[0].name, *([mean(v) for v in zip(*(getattr(u, k) for u in us))] for k in KINDS))
             for us in zip(*(p.units for p in profiles))]
    return dataclasses.replace(first, name=" + ".join(p.name for p in profiles), units=units,
                               **{k: mean([getattr(p, k) for p in profiles]) for k in _TIMED_SCALARS})


# what a calibration times besides the units; mean_profile averages them
_TIMED_SCALARS = ("optimizer_seconds_per_param", "reduce_copy_seconds_per_param", "grad_zero_seconds_per_param",
                  "grad_scale_seconds_per_param", "jitter", "time_slicing_slowdown")


def same_conditions(a: DeviceProfile, b: DeviceProfile) -> bool:
    """Whether two calibrations timed the same work the same way: the device, the network, the
    micro-batch sizes, the threads per worker and the processes training beside."""
    return (a.device, a.model, a.micro_batches, a.threads, a.co_runners, [u.name for u in a.units]) == \
        (b.device, b.model, b.micro_batches, b.threads, b.co_runners, [u.name for u in b.units])


def pooled_profile(own: DeviceProfile, calibrations: Sequence[DeviceProfile]) -> DeviceProfile:
    """`own` with the unit, optimizer and gradient-sweep times the mean, and the jitter the median,
    over those of `calibrations` taken under its conditions (same_conditions; `own`'s own calibrations among
    them); its links, time-slicing slowdown and the rest stay its own. `own` where none match. On a
    shared machine one calibration's unit times swing by more than a prediction's error goal from
    run to run, far more than the machine's speed drifts over a sweep: the mean over all of a
    sweep's calibrations at a size predicts each run better than the ones taken right beside it."""
    same = [p for p in calibrations if same_conditions(p, own)]
    if not same:
        return own
    mean = mean_profile(same)
    sizes = ", ".join(map(str, own.micro_batches))
    return dataclasses.replace(
        own, name=f"{own.name} (pooled: {len(same)} calibrations)", units=mean.units,
        **{k: getattr(mean, k) for k in _TIMED_SCALARS if k not in ("time_slicing_slowdown", "jitter")},
        # the median: one calibration disturbed by something else (0.004 to 15 ms² per second of
        # compute within one sweep here) would set the mean, and with it every meeting's wait
        jitter=statistics.median(p.jitter for p in same),
        assumptions=[*own.assumptions, f"unit, optimizer and gradient-sweep times: the mean of {len(same)} "
                     f"calibrations in this run at micro-batch {sizes} with {own.co_runners} co-runner(s); "
                     "jitter: their median"])


def median_links(profiles: Sequence[DeviceProfile]) -> tuple[Link, Link]:
    """(p2p, all-reduce): each link's median latency, bandwidth and busy share over `profiles`."""
    def median(links: list[Link]) -> Link:
        return Link(bandwidth=statistics.median(x.bandwidth for x in links),
                    latency=statistics.median(x.latency for x in links),
                    busy=statistics.median(x.busy for x in links))

    return median([p.p2p for p in profiles]), median([p.allreduce for p in profiles])


def _model_key(cfg: ModelConfig) -> dict:
    return {"width": cfg.width, "image_size": cfg.image_size, "num_classes": cfg.num_classes}


# --- measuring this machine -----------------------------------------------------------------------

def time_units(cfg: ModelConfig, micro_batch: int, device: str = "cpu", reps: int = 3, seed: int = 0,
               stat: str = "median") -> list[tuple[float, float, float]]:
    """(F, B, W) seconds of each T = 1 pipeline unit at one micro-batch size (see time_unit_sizes)."""
    return time_unit_sizes(cfg, [micro_batch], device, reps, seed, stat)[0]


def time_unit_sizes(cfg: ModelConfig, micro_batches: Sequence[int], device: str = "cpu", reps: int = 3,
                    seed: int = 0, stat: str = "median") -> list[list[tuple[float, float, float]]]:
    """Per micro-batch size, (F, B, W) seconds of each T = 1 pipeline unit (see unit_samples)."""
    return summarize_units(unit_samples(cfg, micro_batches, device, reps, seed), micro_batches, stat)


def unit_samples(cfg: ModelConfig, micro_batches: Sequence[int], device: str = "cpu", reps: int = 3,
                 seed: int = 0) -> dict[tuple[int, int, int], list[float]]:
    """Seconds of each (micro-batch size, unit, k) over `reps` repetitions after a warm-up; k: 0 the
    forward, 1 the input gradient alone (torch.autograd.grad on the input), 2 the whole training
    backward (input and weight gradients into .grad). The first unit has no input gradient.
    Every repetition runs every size and unit in turn, so a burst of load from other processes
    slows one repetition of each, not every repetition of one size."""
    from alexnet_pp.model import AlexNet
    from alexnet_pp.pipeline import pipeline_modules

    gen = torch.Generator().manual_seed(seed)
    model = AlexNet(cfg).to(device).train()
    units = pipeline_modules(model, 1)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    inputs: dict[int, list[torch.Tensor]] = {}
    with torch.no_grad():
        for n in micro_batches:
            x = torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=gen).to(device)
            inputs[n] = []
            for unit in units:
                inputs[n].append(x)
                x = unit(x)

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    samples: dict[tuple[int, int, int], list[float]] = {
        (n, i, k): [] for n in micro_batches for i in range(len(units)) for k in range(3)}
    for rep in range(reps + 1):
        for n in micro_batches:
            for i, unit in enumerate(units):
                xi = inputs[n][i].detach().requires_grad_(i > 0)
                box = {}
                f = timed(lambda: box.setdefault("y", unit(xi)))
                y = box["y"]
                g = torch.ones_like(y)
                full = timed(lambda: y.backward(g))
                b = 0.0
                if i > 0:
                    xi = inputs[n][i].detach().requires_grad_(True)
                    y = unit(xi)
                    b = timed(lambda: torch.autograd.grad(y, xi, g))
                del y, g
                if rep == 0:
                    continue  # warm-up
                for k, t in enumerate((f, b, full)):
                    samples[n, i, k].append(t)
    return samples


def summarize_units(samples: dict[tuple[int, int, int], list[float]], micro_batches: Sequence[int],
                    stat: str = "median") -> list[list[tuple[float, float, float]]]:
    """Per size, (F, B, W) of each unit: the median (or min) of its samples — the median by default,
    since a run's steps meet the same noise. W is the training backward beyond B."""
    units = len({i for _, i, _ in samples})
    pick = _statistic(stat)
    out = []
    for n in micro_batches:
        row = []
        for i in range(units):
            f, b, full = (pick(samples[n, i, k]) for k in range(3))
            row.append((f, 0.0, full) if i == 0 else (f, b, max(full - b, 0.0)))
        out.append(row)
    return out


def measure_jitter(samples: dict[tuple[int, int, int], list[float]], micro_batches: Sequence[int]) -> float:
    """Variance per second of compute: per size, each repetition's training compute (every unit's
    forward and backward) is one sample; the sizes' variances pooled over their mean seconds."""
    var = mean = 0.0
    for n in micro_batches:
        units = sorted({i for m, i, _ in samples if m == n})
        totals = [sum(samples[n, i, 0][r] + samples[n, i, 2][r] for i in units)
                  for r in range(len(samples[n, units[0], 0]))]
        if len(totals) < 2:
            return 0.0
        var += statistics.variance(totals)
        mean += statistics.fmean(totals)
    return var / mean if mean else 0.0


def _statistic(stat: str):
    """How repetitions become one figure: `min` their best, else (the default) their median."""
    return min if stat == "min" else statistics.median


def _repeat(fn, reps: int, device: str, stat: str) -> float:
    """The median (or min) seconds of `reps` calls after one warm-up call."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    times = []
    for _ in range(reps + 1):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return _statistic(stat)(times[1:])


def time_optimizer(cfg: ModelConfig, device: str = "cpu", reps: int = 5, stat: str = "median") -> float:
    """Seconds per parameter of the run's optimizer step (the paper's SGD with momentum, fused
    where torch has it) over the network's own parameters: memory-bound, so linear in their count."""
    from alexnet_pp.config import TrainConfig
    from alexnet_pp.model import AlexNet
    from alexnet_pp.optim import build_optimizer

    params = list(AlexNet(cfg).to(device).parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    opt = build_optimizer(params, TrainConfig())
    return _repeat(opt.step, reps, device, stat) / sum(p.numel() for p in params)


def time_gradient_copies(cfg: ModelConfig, device: str = "cpu", reps: int = 5, stat: str = "median") -> float:
    """Seconds per parameter of what DeepSpeed's ReduceGrads does around the all-reduce: flatten
    the gradients into one buffer, scale it, copy each slice back."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    from alexnet_pp.model import AlexNet

    grads = [torch.randn_like(p) for p in AlexNet(cfg).to(device).parameters()]

    def copies() -> None:
        flat = _flatten_dense_tensors(grads)
        flat.mul_(1.0)
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)

    return _repeat(copies, reps, device, stat) / sum(g.numel() for g in grads)


def time_flat_gradients(cfg: ModelConfig, device: str = "cpu", reps: int = 5, stat: str = "median") -> tuple[float, float]:
    """Seconds per parameter of zeroing the flat gradient buffer and of scaling it by 1/D, the two
    sweeps over it that flat gradients leave to the engine besides the all-reduce."""
    from alexnet_pp.shapes import layer_param_counts

    n = sum(layer_param_counts(cfg))  # the count alone: no network to build
    flat = torch.randn(n, device=device)
    return (_repeat(flat.zero_, reps, device, stat) / n,
            _repeat(lambda: flat.mul_(0.5), reps, device, stat) / n)


def _links_worker(rank: int, init_file: str, out_file: str, backend: str, sizes: list[int], reps: int,
                  stat: str = "median") -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=2)
    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    sync = torch.cuda.synchronize if backend == "nccl" else (lambda: None)
    pick = _statistic(stat)
    p2p, ar, busy = [], [], []
    for nbytes in sizes:
        t = torch.zeros(max(1, nbytes // 4), device=device)
        rts, ars, cpus = [], [], []
        for _ in range(reps + 1):
            dist.barrier()
            sync()
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(t, 1)
                dist.recv(t, 1)
            else:
                dist.recv(t, 0)
                dist.send(t, 0)
            sync()
            rts.append(time.perf_counter() - t0)
            dist.barrier()
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            dist.all_reduce(t)
            sync()
            ars.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)  # gloo's own threads do the work: the whole process
        p2p.append(pick(rts[1:]) / 2)  # the first of each size warms the connection up
        ar.append(pick(ars[1:]))
        busy.append(pick([c / w for c, w in zip(cpus[1:], ars[1:])]))
    if rank == 0:
        Path(out_file).write_text(json.dumps({"sizes": sizes, "p2p": p2p, "allreduce": ar,
                                              "allreduce_busy": busy if backend == "gloo" else None}))
    dist.destroy_process_group()


def measure_links(backend: str = "gloo", sizes: Sequence[int] = (4096, 1 << 20, 8 << 20, 32 << 20),
                  reps: int = 5, timeout_s: float = 300.0, stat: str = "median",
                  beside: Optional[tuple[ModelConfig, int, int]] = None) -> tuple[Link, Link]:
    """(p2p, all-reduce) links between two processes of this machine on `backend`: one-way time of
    a ping-pong and a two-rank all-reduce at several sizes, the median (or min) of `reps` after one
    that warms the connection, as latency + bytes / bandwidth (the all-reduce as the ring model's
    2·latency + bytes / bandwidth for two ranks, with its Link.busy at the largest size on gloo).
    The processes are plain subprocesses, so a caller's unguarded main script is not run again
    (as spawn would).
    `beside` = (model, count, micro_batch): measured while `count` processes train the model (one
    thread each), as a pipeline's other stages compute while two of them pass a micro-batch: a
    blocked receiver then waits for a core to wake on."""
    others = start_co_runners(beside[0], beside[1], 1, beside[2]) if beside and beside[1] else []
    try:
        return _links_between_two(backend, sizes, reps, timeout_s, stat)
    finally:
        stop_co_runners(others)


def _links_between_two(backend: str, sizes: Sequence[int], reps: int, timeout_s: float,
                       stat: str) -> tuple[Link, Link]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    with tempfile.TemporaryDirectory() as tmp:
        init, out = os.path.join(tmp, "init"), os.path.join(tmp, "out.json")
        code = ("import sys; from alexnet_pp.planning.profile import _links_worker; "
                "_links_worker(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], "
                "[int(x) for x in sys.argv[5].split(',')], int(sys.argv[6]), sys.argv[7])")
        args = [init, out, backend, ",".join(map(str, sizes)), str(reps), stat]
        procs = [subprocess.Popen([sys.executable, "-c", code, str(rank), *args], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for rank in (0, 1)]
        errors = []
        for proc in procs:
            try:
                _, err = proc.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if proc.returncode:
                errors.append(err.decode(errors="replace")[-2000:])
        if errors:
            raise RuntimeError("measuring links failed:\n" + "\n".join(errors))
        res = json.loads(Path(out).read_text())
    ar = _link_from(res["sizes"], res["allreduce"], 2)
    if res.get("allreduce_busy"):  # at the largest size, where the bytes rather than the latency count
        ar = dataclasses.replace(ar, busy=min(1.0, res["allreduce_busy"][res["sizes"].index(max(res["sizes"]))]))
    return _link_from(res["sizes"], res["p2p"], 1), ar


def _link_from(sizes: list[int], seconds: list[float], messages: int) -> Link:
    """Latency from the smallest message, bandwidth from the largest against it: a least-squares
    line through noisy small-message times can slope the wrong way."""
    (s0, t0), (s1, t1) = min(zip(sizes, seconds)), max(zip(sizes, seconds))
    bandwidth = (s1 - s0) / (t1 - t0) if t1 > t0 else s1 / t1
    return Link(bandwidth=bandwidth, latency=max(t0 / messages, 1e-7))


_CO_RUNNER = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
from alexnet_pp.host import reuse_freed_memory
reuse_freed_memory()
from alexnet_pp.config import ModelConfig
from alexnet_pp.model import AlexNet
cfg = ModelConfig(width=float(sys.argv[2]), image_size=int(sys.argv[3]), num_classes=int(sys.argv[4]), dropout=0.0)
model = AlexNet(cfg).train()
x = torch.randn(int(sys.argv[5]), 3, cfg.image_size, cfg.image_size)
print("ready", flush=True)
while True:
    model(x).sum().backward()
"""


def start_co_runners(cfg: ModelConfig, count: int, threads: int, micro_batch: int) -> list[subprocess.Popen]:
    """`count` processes training the same network in a loop, as the other workers of a run on this
    machine would, so measured times include their pull on shared cores, caches and memory bus."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    procs = [subprocess.Popen([sys.executable, "-c", _CO_RUNNER, str(max(threads, 1)), str(cfg.width),
                               str(cfg.image_size), str(cfg.num_classes), str(micro_batch)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for _ in range(count)]
    for proc in procs:
        proc.stdout.readline()  # "ready": the model is built and the loop starts
    return procs


def stop_co_runners(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=30)


def oversubscribed(workers: int, threads: int, cores: int) -> bool:
    """Whether `workers` processes of `threads` torch threads outnumber a CPU's `cores` (0: a device
    per worker, never)."""
    return bool(cores) and workers * max(threads, 1) > cores


def with_time_slicing(profile: DeviceProfile, slowdown: float, workers: int, note: str = "") -> DeviceProfile:
    """`profile` carrying a measured time_slicing_slowdown, with the measurement named among its
    assumptions."""
    return dataclasses.replace(profile, time_slicing_slowdown=slowdown, assumptions=profile.assumptions + [
        f"time slicing: a pass took {slowdown:.3f}× the CPU with {workers} processes (at most twice the cores) "
        f"as beside the co-runners{note}"])


def time_slicing_slowdown(cfg: ModelConfig, workers: int, co_runners: int, threads: int = 1, micro_batch: int = 16,
                          reps: int = 15) -> float:
    """How much more CPU a training pass costs here while `workers` processes share the cores (at
    most twice the processes the cores run at once) than beside `co_runners` (the calibration's):
    the median over `reps` of this process's CPU seconds per pass with the extra co-runners running,
    over the same with them paused (SIGSTOP), the two alternating so that drift cancels. Never under
    1: sharing cores makes no work cheaper, and a lower ratio is noise."""
    import signal

    from alexnet_pp.host import cores
    from alexnet_pp.model import AlexNet

    slots = max(1, cores() // max(threads, 1))
    extra = max(1, min(workers, 2 * slots) - 1 - co_runners)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, 1))
    model = AlexNet(dataclasses.replace(cfg, dropout=0.0)).train()
    x = torch.randn(micro_batch, 3, cfg.image_size, cfg.image_size)

    def cpu_per_pass(passes: int = 2) -> float:
        model(x).sum().backward()  # the first slices after a switch refill the caches
        t0 = time.process_time()
        for _ in range(passes):
            model(x).sum().backward()
        return (time.process_time() - t0) / passes

    def signal_all(procs: list[subprocess.Popen], sig: int) -> None:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):  # one that died is stopped below all the same
                os.kill(proc.pid, sig)

    procs: list[subprocess.Popen] = []
    ratios = []
    try:
        procs += start_co_runners(cfg, co_runners, threads, micro_batch)
        extras = start_co_runners(cfg, extra, threads, micro_batch)
        procs += extras
        for rep in range(reps):
            seconds = {}
            for running in ((False, True) if rep % 2 == 0 else (True, False)):
                signal_all(extras, signal.SIGCONT if running else signal.SIGSTOP)
                seconds[running] = cpu_per_pass()
            ratios.append(seconds[True] / seconds[False])
    finally:
        signal_all(procs, signal.SIGCONT)  # a stopped process would not act on SIGTERM
        stop_co_runners(procs)
        torch.set_num_threads(prev_threads)
    return max(1.0, statistics.median(ratios))


def _memory_bytes(device: str) -> Optional[int]:
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def measure_profile(model_cfg: ModelConfig, micro_batches: Sequence[int] = (16, 32), device: str = "cpu",
                    reps: int = 5, threads: int = 1, links: str = "measure", name: Optional[str] = None,
                    seed: int = 0, co_runners: int = 0, stat: str = "median") -> DeviceProfile:
    """Time this machine as a run's workers would use it: units at each micro-batch size with
    `threads` torch threads (the engine's train.threads) and the host allocator the trainers use;
    the optimizer; and with links="measure" two processes' p2p and all-reduce on the run's backend
    (gloo on CPU, nccl with two GPUs), else placeholder links named in `assumptions`.

    `co_runners`: other processes training the network meanwhile — on a CPU whose cores the run's
    workers share, k workers per machine means k − 1 co-runners (the profile then holds for runs of
    k workers a machine)."""
    from alexnet_pp.host import configure_host, cores

    if len(micro_batches) < 1:
        raise ValueError("measure at one or more micro-batch sizes (two or more to fit a + b·n)")
    gpu = str(device).startswith("cuda")
    shared_cores = 0 if gpu else cores()  # a CPU's workers share its cores; GPU workers have a device each
    backend = "nccl" if gpu else "gloo"
    measured_links = links == "measure" and (backend == "gloo" or torch.cuda.device_count() >= 2)
    if measured_links:  # first: a failure here should not cost the unit timings
        p2p, ar = measure_links(backend)
    else:
        p2p, ar = Link(bandwidth=2e9, latency=50e-6), Link(bandwidth=2e9, latency=50e-6)
    prev_threads = torch.get_num_threads()
    configure_host(threads, keep_freed_memory=True)
    others = start_co_runners(model_cfg, co_runners, threads, min(micro_batches)) if co_runners else []
    try:
        samples = unit_samples(model_cfg, micro_batches, device, reps, seed)
        opt = time_optimizer(model_cfg, device, reps, stat)
        copies = time_gradient_copies(model_cfg, device, reps, stat)
        zero, scale = time_flat_gradients(model_cfg, device, reps, stat)
    finally:
        stop_co_runners(others)
        torch.set_num_threads(prev_threads)
    per_size = summarize_units(samples, micro_batches, stat)
    units = [UnitTimes(nm, *[[per_size[j][i][k] for j in range(len(micro_batches))] for k in range(3)])
             for i, nm in enumerate(unit_names(1))]
    sharing = (f"while {co_runners} other process(es) trained the same network, as fellow workers on this "
               "machine would" if co_runners else "one worker at a time: workers sharing a memory bus or cores "
               "run slower than this")
    assumptions = [
        f"unit times: the {stat} of {reps} runs on {device} with {threads or torch.get_num_threads()} thread(s) per "
        f"worker, {sharing}",
        "micro-batch scaling: a + b·n least squares over the measured sizes " + ", ".join(map(str, micro_batches)),
        f"jitter: the variance of the {reps} repetitions' compute, pooled over the sizes",
    ]
    if shared_cores:
        assumptions.append(f"the workers share this machine's {shared_cores} cores: while more of them compute than "
                           "the cores hold, each runs slower in proportion (costmodel.compute_rate)")
    if measured_links:
        assumptions.append(f"links measured between two processes of this machine on {backend}")
    else:
        assumptions.append("links not measured: assumed 2 GB/s and 50 µs per message (a loopback TCP guess)")
    return DeviceProfile(
        name=name or f"measured-{device}", device=device, micro_batches=list(micro_batches), units=units,
        optimizer_seconds_per_param=opt, reduce_copy_seconds_per_param=copies,
        grad_zero_seconds_per_param=zero, grad_scale_seconds_per_param=scale, p2p=p2p, allreduce=ar,
        memory_bytes=_memory_bytes(device),
        threads=0 if gpu else threads, model=_model_key(model_cfg), cores=shared_cores, co_runners=co_runners,
        jitter=measure_jitter(samples, micro_batches), assumptions=assumptions, created=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )


# --- devices this machine does not have: named public figures -------------------------------------

# The repository's own H100 run (benchmarks/results/h100-2026-11-28/final/gpu_bench.json): the engine
# (1,1,1) in float32 on one H100 80GB HBM3 ran the paper network at batch 128 at 9177 img/s, i.e.
# 13.95 ms a step, of which 1.99 ms was the optimizer step.
_H100_STEP_S, _H100_OPT_S, _H100_BATCH, _PAPER_PARAMS = 128 / 9177.0, 1.99e-3, 128, 60_965_224
_LAUNCH_S = 15e-6  # per unit and kind: kernel launches that do not shrink with the micro-batch

NVLINK4 = Link(bandwidth=450e9, latency=10e-6)
IB_NDR = Link(bandwidth=50e9, latency=15e-6)
ASSUMED = ("h100-nvlink", "h100-ib")


def assumed_gpu_profile(name: str, model_cfg: Optional[ModelConfig] = None) -> DeviceProfile:
    """An H100 profile from public link figures and this repository's one measured H100 step.

    h100-nvlink: every worker in one NVLink 4 domain. h100-ib: DGX H100-style nodes of 8 GPUs on
    NVLink 4, nodes joined by InfiniBand NDR, one 400 Gb/s NIC per GPU."""
    if name not in ASSUMED:
        raise ValueError(f"unknown assumed profile {name!r}; choose one of {', '.join(ASSUMED)}")
    cfg = model_cfg or ModelConfig()
    paper_macs = layer_macs(ModelConfig())
    units = pipeline_units(1)
    n_units = len(units)
    # FLOPs per image of each kind: 2 per multiply-add; conv1 computes no input gradient.
    paper_flops = sum(2 * paper_macs[u.layer] / (1 if u.tower is None else 2) * (3 if i else 2)
                      for i, u in enumerate(units))
    compute_s = _H100_STEP_S - _H100_OPT_S - 3 * n_units * _LAUNCH_S
    rate = paper_flops * _H100_BATCH / compute_s  # sustained FLOP/s
    macs = layer_macs(cfg)
    ns = [32, 128]
    times = []
    for i, u in enumerate(units):
        per_image = 2 * macs[u.layer] / (1 if u.tower is None else 2) / rate
        f = [_LAUNCH_S + per_image * n for n in ns]
        b = [_LAUNCH_S + per_image * n for n in ns] if i else [0.0, 0.0]
        w = [_LAUNCH_S + per_image * n for n in ns]
        times.append(UnitTimes(u.name, f, b, w))
    assumptions = [
        f"compute: multiply-adds of each unit (F = B = W = 2 FLOPs per multiply-add, conv1 no B) at a sustained "
        f"{rate / 1e12:.1f} TFLOP/s, calibrated so the paper network's float32 step at batch {_H100_BATCH} takes "
        f"the {1000 * _H100_STEP_S:.2f} ms measured on one H100 80GB (benchmarks/results/h100-2026-11-28); "
        "pointwise layers (LRN, pooling) ride along in proportion",
        f"kernel launches: {1e6 * _LAUNCH_S:.0f} µs per unit for each of F, B, W, whatever the micro-batch",
        f"optimizer: {1000 * _H100_OPT_S:.2f} ms per {_PAPER_PARAMS:,} parameters, the same H100 run's optimizer "
        "phase (DeepSpeed's gradient copies in ReduceGrads included)",
        "memory: 80 GiB per GPU (H100 80GB)",
        "NVLink 4: 900 GB/s bidirectional per H100 = 450 GB/s per direction, for p2p and as ring all-reduce "
        "bandwidth; 10 µs per message (NCCL small-message latency, assumed)",
    ]
    inter, per_node = None, 0
    if name == "h100-nvlink":
        assumptions.append("all workers in one NVLink domain (beyond 8 GPUs this needs an NVLink switch system)")
    else:
        inter, per_node = IB_NDR, 8
        assumptions += [
            "8 GPUs per node on NVLink 4; InfiniBand NDR between nodes, 400 Gb/s = 50 GB/s per GPU (one NIC per "
            "GPU, as in DGX H100), 15 µs per message (assumed); rings spanning nodes run at the InfiniBand rate",
        ]
    return DeviceProfile(
        name=name, device="NVIDIA H100 80GB (assumed)", micro_batches=ns, units=times,
        optimizer_seconds_per_param=_H100_OPT_S / _PAPER_PARAMS, p2p=NVLINK4, allreduce=NVLINK4,
        inter_node=inter, workers_per_node=per_node, memory_bytes=80 * 2**30, model=_model_key(cfg),
        assumptions=assumptions, created="assumed",
    )
