"""One run's configuration: a dataclass tree, loadable from YAML, overridable from the command line.

Start here to understand a run. `RunConfig` holds everything; `PRESETS` are the three starting
points (`paper`, `demo`, `test`) as plain data; `load_config(preset, yaml_path, overrides)` is what
the command line calls (one parser for `alexnet-pp` and `python -m cluster.job`: cluster/cli.py).
`validate()` rejects bad model, data and recipe settings before anything starts, with a message that
says what to change; the parallel layout (P × T × D, micro-batches, partition, precision, ZeRO) is
checked once, by `alexnet_pp.layout.Layout.from_config`.

Every setting can be given on the command line: dotted paths for sections (`--train.lr 0.02`,
`--model.width 0.5`, `--parallel.pp 2`), plain names for top-level keys (`--name exp1`,
`--out_dir /scratch/runs`).
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from alexnet_pp.errors import ConfigError
from alexnet_pp.shapes import check_model_config


@dataclass
class ModelConfig:
    """The network. width=1, image_size=224, num_classes=1000 is exactly the paper's AlexNet."""

    width: float = 1.0  # multiplies every layer's channel / neuron count
    image_size: int = 224  # crop side fed to the network (224 is zero-padded to 227)
    num_classes: int = 1000
    lrn_order: Literal["paper", "caffenet"] = "paper"  # paper: ReLU→LRN→pool; caffenet: ReLU→pool→LRN
    dropout: float = 0.5  # on fc6 and fc7, training only
    # paper: N(0, 0.01²) weights, biases 1 in conv2/4/5, fc6/7. It needs the paper's many epochs at
    # full width; scaled-down networks trained for minutes learn from a fan-in (He) init instead.
    init: Literal["paper", "kaiming"] = "paper"
    lrn_size: int = 5
    lrn_alpha: float = 1e-4  # paper's α (not divided by size, unlike torch.nn.LocalResponseNorm)
    lrn_beta: float = 0.75
    lrn_k: float = 2.0


@dataclass
class DataConfig:
    """Where images come from and how they are augmented."""

    # WebDataset shard sources for the two splits: a path, a brace pattern
    # (`train-{000000..000127}.tar`), a `pipe:` command, or a directory holding `{split}-*.tar`.
    # Empty means the embedded synthetic dataset, generated under `synthetic_dir` on first use.
    train: str = ""
    val: str = ""
    synthetic_dir: str = "data/synthetic"
    synthetic_classes: int = 10
    synthetic_train_per_class: int = 1000
    synthetic_val_per_class: int = 100
    stored_size: int = 256  # side of the stored images; training takes random image_size crops of it
    seed: int = 0  # dataset generation seed (the stream's shuffle seed is train.seed)
    workers: int = 2  # augmentation worker processes per rank (0: in the main process)
    shuffle_buffer: int = 1000
    color_noise: float = 0.1  # std of the paper's PCA lighting noise; 0 turns it off
    flip: bool = True
    eval_crops: Literal[1, 10] = 1  # 10: four corners + centre, each flipped, softmax averaged
    resampled: bool = False  # sample shards with replacement; needs epoch_samples
    epoch_samples: int = 0  # samples per epoch over the whole job (0: one pass over the data)
    skip_bad_shards: bool = False  # a shard that cannot be opened: error (default) or skip and count
    # JSON file keeping the sample counts of remote shards without a manifest across processes
    # ("": counted once per process); `data ingest` writes manifests that make counting unnecessary
    count_cache: str = ""
    decode: Literal["cpu", "gpu", "auto"] = "auto"  # where loaders given a device decode JPEGs (docs/DATA.md)
    batch_slots: int = 4  # reused shared-memory batch buffers per worker on CPU-only hosts (0: a new one per batch)
    # Ray actors that decode and augment for each first-stage rank in place of its data.workers, on any
    # node with augment_cpus free CPUs (CPU-only nodes too); the same batches as data.workers = N
    # (cluster/augment_actors.py). Distributed runs only.
    augment_actors: int = 0
    augment_cpus: float = 1.0
    augment_prefetch: int = 2  # batches requested ahead per actor: the back-pressure bound


@dataclass
class TrainConfig:
    """The optimisation recipe (paper defaults) and the loop around it."""

    batch_size: int = 128  # global batch per optimizer step
    epochs: float = 90
    max_steps: int = 0  # stop after this many optimizer steps (0: run all epochs)
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["plateau", "step", "cosine", "constant"] = "plateau"
    lr_factor: float = 0.1  # plateau and step: multiply the lr by this
    plateau_patience: int = 1  # evaluations without improvement before the lr drops
    step_epochs: float = 30  # step: drop every this many epochs
    grad_clip: float = 0.0  # max global gradient norm (0: off)
    seed: int = 0
    eval_every: float = 1.0  # epochs between evaluations on the held-out split
    log_every: int = 10  # steps between log lines when output is not a terminal
    threads: int = 0  # torch intra-op threads per process (0: torch's default)
    keep_freed_memory: bool = True  # host allocator keeps freed memory for reuse (alexnet_pp/host.py)


@dataclass
class ParallelConfig:
    """P pipeline stages × T towers per stage × D data-parallel replicas (docs/ARCHITECTURE.md,
    "Parallelism"); checked as a whole by alexnet_pp.layout.Layout."""

    pp: int = 1
    tp: Literal[1, 2] = 1
    dp: int = 1
    micro_batches: int = 1  # per optimizer step and replica (DeepSpeed's gradient_accumulation_steps)
    partition: str = "measured"  # measured | flops | uniform | parameters | cut points "3,6" or "conv3.0[82:]"
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    # fp32; bf16-mixed: float32 weights, gradients and optimizer, every stage's forward under bf16 autocast
    # (the plain step's torch.autocast); bf16 / fp16: DeepSpeed's optimizers over bf16 / fp16 weights
    precision: Literal["fp32", "bf16-mixed", "bf16", "fp16"] = "fp32"
    # Convolutions on channels-last (NHWC) activations, as the fastest plain GPU step runs them; stages
    # still exchange NCHW tensors (point-to-point sends need contiguous ones). Same math, other kernels.
    channels_last: bool = False
    activation_checkpoint_interval: int = 0
    # FC weight gradients once per step (fp32 without ZeRO; alexnet_pp/deferred_grads.py). Off by default:
    # it shortens the stage holding fc6/fc7, which pays only where that stage is the slowest.
    defer_weight_grads: bool = False
    # float32 without ZeRO: gradients accumulate in one flat buffer the replicas average in place
    # (cluster/replica_grads.py); false: DeepSpeed's own reduce, which flattens and copies back every step
    flat_grads: bool = True
    # pipeline schedule: DeepSpeed's 1F1B, or ZB-H1 (cluster/zero_bubble.py: every weight gradient its own
    # W pass, filling 1F1B's cool-down; float32 without ZeRO or activation checkpointing)
    schedule: Literal["1f1b", "zb-h1"] = "1f1b"
    zero_stage: Literal[0, 1] = 0
    max_failures: int = 2  # worker-group restarts before the job fails
    collective_timeout_s: float = 300.0
    # A node lost and not replaced within elastic_wait_s: restart with fewer replicas (D' < D) and
    # micro_batches × D / D' micro-batches, so the global batch stays (cluster/elastic.py). Off: wait
    # for the cluster to fit the whole job again.
    elastic: bool = False
    elastic_wait_s: float = 60.0


@dataclass
class CheckpointConfig:
    dir: str = ""  # empty: <run_dir>/checkpoints
    every_steps: int = 0  # 0: only at the end
    keep: int = 2
    resume: bool = True  # continue from the newest complete checkpoint in dir


@dataclass
class MetricsConfig:
    enabled: bool = True
    host: str = "127.0.0.1"  # address the workers' endpoints bind to ("node" for the node's IP)
    port: int = 0  # 0: any free port
    sd_port: int = 9400  # driver's HTTP service-discovery port (deploy/ uses 9400; taken or 0: a free one, logged)


@dataclass
class RunConfig:
    name: str = "alexnet"
    out_dir: str = "runs"  # run_dir = out_dir/name holds config, summary, history, checkpoints
    # extra callbacks constructed on every worker: "package.module:Class[,…]" (cluster/callbacks.py)
    callbacks: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> "RunConfig":
        validate(self)
        return self


# ---------------------------------------------------------------------------------------------
# presets: settings on top of the dataclass defaults (which are the paper's)

PRESETS: dict[str, dict[str, Any]] = {
    # the exact network and recipe; needs ImageNet shards in data.train / data.val
    "paper": {"name": "paper"},
    # scaled to finish in a few minutes on 2 CPU cores on the embedded dataset
    "demo": {
        "name": "demo",
        "model": {"width": 0.5, "image_size": 112, "num_classes": 10, "init": "kaiming"},
        "data": {"synthetic_dir": "data/synthetic-128", "synthetic_classes": 10, "synthetic_train_per_class": 800,
                 "synthetic_val_per_class": 100, "stored_size": 128, "shuffle_buffer": 2000},
        "train": {"batch_size": 64, "epochs": 6, "lr": 0.01, "schedule": "cosine", "eval_every": 1.0},
        # as a pipeline: 4 micro-batches of 16 keep the bubble at (P-1)/(P+3)
        "parallel": {"micro_batches": 4},
    },
    # seconds, for the test suite
    "test": {
        "name": "test",
        "model": {"width": 0.25, "image_size": 64, "num_classes": 10, "init": "kaiming"},
        "data": {"synthetic_dir": "data/synthetic-72", "synthetic_classes": 10, "synthetic_train_per_class": 120,
                 "synthetic_val_per_class": 20, "stored_size": 72, "workers": 0, "shuffle_buffer": 300},
        "train": {"batch_size": 32, "epochs": 4, "lr": 0.02, "schedule": "cosine", "eval_every": 1.0},
        "metrics": {"enabled": False},
    },
}


def preset(name: str) -> RunConfig:
    """A fresh RunConfig for one of `PRESETS`."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = RunConfig()
    _apply(cfg, copy.deepcopy(PRESETS[name]), "")
    return cfg


# ---------------------------------------------------------------------------------------------
# loading: YAML dicts and dotted overrides, with type checking against the dataclass fields


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        for c in choices:
            if value == c or (isinstance(value, str) and str(c) == value):
                return c
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where)
    return value


def _build(cls: type, data: dict[str, Any], where: str = "") -> Any:
    obj = cls()
    _apply(obj, data, where)
    return obj


def _apply(obj: Any, data: dict[str, Any], where: str) -> None:
    hints = _hints(type(obj))
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in hints:
            known = ", ".join(hints)
            raise ConfigError(f"unknown setting {path!r}; {type(obj).__name__} has: {known}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            _apply(getattr(obj, key), value, path)
        else:
            setattr(obj, key, _coerce(value, tp, path))


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Apply {"train.lr": "0.02", ...}; values given as strings are parsed as YAML scalars."""
    for dotted, raw in overrides.items():
        value = yaml.safe_load(raw) if isinstance(raw, str) else raw
        if isinstance(raw, str) and value is None and raw.strip() not in ("null", "~", ""):
            value = raw
        if isinstance(value, (dict, list)):  # keep strings like "3,6" or "{a..b}" as given
            value = raw
        parts = dotted.split(".")
        nested: dict[str, Any] = {parts[-1]: value}
        for p in reversed(parts[:-1]):
            nested = {p: nested}
        _apply(cfg, nested, "")
    return cfg


def top_level_keys() -> tuple[str, ...]:
    """RunConfig's own scalar settings (`name`, `out_dir`, …), given on the command line as `--name`."""
    return tuple(f.name for f in dataclasses.fields(RunConfig) if not dataclasses.is_dataclass(_hints(RunConfig)[f.name]))


def parse_override_args(args: list[str]) -> dict[str, str]:
    """`["--train.lr", "0.02", "--model.width=0.5", "--out-dir", "x"]` →
    {"train.lr": "0.02", "model.width": "0.5", "out_dir": "x"}. Top-level keys may use - for _."""
    out: dict[str, str] = {}
    top = top_level_keys()
    i = 0
    while i < len(args):
        a = args[i]
        key = a[2:].split("=", 1)[0] if a.startswith("--") else ""
        if "." not in key and key.replace("-", "_") in top:
            key = key.replace("-", "_")
        elif not key or "." not in key:
            raise ConfigError(f"unexpected argument {a!r}; settings are given as --section.key VALUE "
                              f"(or --{' / --'.join(top)} VALUE)")
        if "=" in a:
            v = a.split("=", 1)[1]
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{a} needs a value")
            v = args[i + 1]
            i += 2
        out[key] = v
    return out


def load_config(
    preset_name: str = "demo",
    yaml_path: Optional[str | Path] = None,
    overrides: Optional[dict[str, Any]] = None,
    check_data: bool = True,
) -> RunConfig:
    """preset → YAML file on top → dotted overrides on top; then validated (without the data checks
    where only the model matters, as for `alexnet-pp info`)."""
    cfg = preset(preset_name)
    if yaml_path:
        text = Path(yaml_path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{yaml_path}: expected a mapping at the top level")
        _apply(cfg, data, "")
    if overrides:
        apply_overrides(cfg, overrides)
    return validate(cfg, check_data)


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from `to_dict()` output (what travels to Ray workers and checkpoints)."""
    return validate(_build(RunConfig, copy.deepcopy(data)))


# ---------------------------------------------------------------------------------------------
# validation: everything that can be known before a worker starts


def validate(cfg: RunConfig, check_data: bool = True) -> RunConfig:
    """Model, data and recipe settings. The layout's checks live in alexnet_pp.layout.Layout."""
    m, d, t = cfg.model, cfg.data, cfg.train
    check_model_config(m)
    if d.stored_size < m.image_size:
        raise ConfigError(
            f"data.stored_size ({d.stored_size}) is smaller than model.image_size ({m.image_size}); "
            "training crops image_size out of stored images"
        )
    if check_data and not d.train and d.synthetic_classes != m.num_classes:
        raise ConfigError(
            f"the embedded dataset has data.synthetic_classes={d.synthetic_classes} classes but "
            f"model.num_classes={m.num_classes}; set them equal, or point data.train/data.val at shards"
        )
    if bool(d.train) != bool(d.val):
        raise ConfigError("set both data.train and data.val (or neither, for the embedded dataset)")
    if d.workers < 0:
        raise ConfigError("data.workers must be ≥ 0")
    if d.augment_actors < 0 or d.augment_cpus <= 0 or d.augment_prefetch < 1:
        raise ConfigError(f"data.augment_actors must be ≥ 0 (got {d.augment_actors}), data.augment_cpus > 0 "
                          f"(got {d.augment_cpus}) and data.augment_prefetch ≥ 1 (got {d.augment_prefetch})")
    if d.decode == "gpu" and cfg.parallel.gpus_per_worker <= 0:
        raise ConfigError("data.decode gpu decodes JPEGs on the first-stage ranks' GPUs, and "
                          "parallel.gpus_per_worker is 0: give the workers GPUs, or set data.decode cpu "
                          "or auto (auto decodes on the GPU where there is one)")
    if d.resampled and d.epoch_samples <= 0:
        raise ConfigError("data.resampled needs data.epoch_samples > 0 (samples per epoch over the job)")
    if t.batch_size <= 0 or t.lr <= 0 or t.epochs <= 0:
        raise ConfigError("train.batch_size, train.lr and train.epochs must be positive")
    if not 0 <= m.dropout < 1:
        raise ConfigError("model.dropout must be in [0, 1)")
    return cfg
