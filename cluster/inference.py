"""Using a trained network: export a checkpoint to one file, evaluate it, predict classes of images.

    alexnet-pp export RUN_OR_CHECKPOINT model.safetensors
    alexnet-pp eval --checkpoint SOURCE [--preset P --data.val SHARDS --data.eval_crops 10] [--device cuda] [--workers N]
    alexnet-pp predict --checkpoint SOURCE IMAGE... [--json] [--top 5]

SOURCE is an exported file, a checkpoint directory (`…/checkpoints/step00000040`), a checkpoint
root, or a run directory (its newest complete checkpoint). Checkpoints are layout-free
(alexnet_pp/weights.py), so a model trained as any (P, T, D) loads into the single network here.
Evaluation is the in-training evaluation (alexnet_pp/steps.py: the same crops, softmax averaging and
tallies), data-parallel over `--workers` processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
import yaml

from alexnet_pp.config import ModelConfig, RunConfig, from_dict, load_config, parse_override_args
from alexnet_pp.model import AlexNet
from alexnet_pp.weights import CheckpointError, check_shapes, export_file, read_export, read_parts
from cluster.checkpoint import MARKER, CheckpointStore, checkpoint_dir
from alexnet_pp.data import build_eval_loader
from alexnet_pp.data import transforms as T
from alexnet_pp.data.ingest import load_image
from alexnet_pp.data.shards import read_classes
from alexnet_pp.steps import EvalAccumulator, crop_averaged_probs
from cluster.spawn import free_port, start_ranks


def find_checkpoint(source: str | Path) -> Path:
    """The checkpoint directory `source` names: itself, the newest complete one under it, or the
    newest of the run it is the directory of."""
    source = Path(source)
    if not source.exists():
        raise CheckpointError(f"{source}: no such file or directory")
    if (source / MARKER).is_file():
        return source
    if source.name.startswith("step") and source.is_dir():
        raise CheckpointError(f"{source}: incomplete checkpoint ({MARKER} missing: not every rank finished "
                              "writing it); use an older one")
    roots = [source]
    if (source / "config.yaml").is_file():  # a run directory: its configured checkpoint dir
        roots.insert(0, checkpoint_dir(run_config(source)))
    roots.append(source / "checkpoints")
    for root in roots:
        latest = CheckpointStore(root).latest()
        if latest is not None:
            return Path(root) / latest[1]
    raise CheckpointError(f"{source}: no complete checkpoint (a step… directory with {MARKER}) in it")


def run_config(run_dir: Path) -> RunConfig:
    return from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))


def model_config(saved: dict[str, Any]) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in saved.items() if k in names})


def load_checkpoint_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The single network's state dict from a layout-free checkpoint, checked against its shapes."""
    info = json.loads((directory / MARKER).read_text())
    model = AlexNet(model_config(info["model"]))
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = read_parts(directory, expected, momentum=False)
    check_shapes(state, expected, directory)
    return state, info


def load_model(source: str | Path) -> tuple[AlexNet, dict[str, Any]]:
    """The network and its metadata (model, classes, step, …) from an exported file or a checkpoint."""
    source = Path(source)
    if source.is_file():
        return AlexNet.from_pretrained(source), read_export(source)[1]
    directory = find_checkpoint(source)
    state, info = load_checkpoint_state(directory)
    model = AlexNet(model_config(info["model"]))
    model.load_state_dict(state)
    run_dir = directory.parent.parent
    cfg = run_config(run_dir) if (run_dir / "config.yaml").is_file() else None
    model.classes = dataset_classes(cfg) if cfg else []
    return model.eval(), {"model": info["model"], "classes": model.classes, "step": info["step"],
                          "stored_size": cfg.data.stored_size if cfg else None}


def dataset_classes(cfg: RunConfig) -> list[str]:
    """Class names from the dataset's classes.json, without generating or streaming anything."""
    spec = cfg.data.val or cfg.data.synthetic_dir
    for candidate in (Path(spec), Path(spec).parent):
        names = read_classes(candidate) if candidate.is_dir() else None
        if names:
            return names
    return []


def export(source: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the single network's weights with their config and class names to `out` (whole or not at all)."""
    directory = find_checkpoint(source)
    state, info = load_checkpoint_state(directory)
    run_dir = directory.parent.parent
    cfg = run_config(run_dir) if (run_dir / "config.yaml").is_file() else None
    classes = dataset_classes(cfg) if cfg else []
    stored = cfg.data.stored_size if cfg else None
    extra = {"step": info["step"], "checkpoint": str(directory), "layout": info.get("layout"), "stored_size": stored}
    export_file(out, state, info["model"], classes, extra)
    return {"checkpoint": str(directory), "step": info["step"], "classes": len(classes)}


# --- evaluation -----------------------------------------------------------------------------------


def evaluate(source: str | Path, cfg: RunConfig, device: str = "cpu", workers: int = 1) -> dict[str, float]:
    """Top-1 / top-5 / loss over cfg's validation split with the checkpoint's network, as the
    in-training evaluation computes them; `workers` processes each evaluate one part."""
    model, meta = load_model(source)
    cfg.model = model_config(meta["model"])
    if workers <= 1:
        return _evaluate_part(model, cfg, device, 0, 1)
    with tempfile.TemporaryDirectory(prefix="alexnet-pp-eval-") as tmp:
        start_ranks(_eval_worker, (workers, free_port(), str(source), cfg.to_dict(), device, tmp), workers, join=True)
        return pickle.loads((Path(tmp) / "result.pkl").read_bytes())


def _evaluate_part(model: AlexNet, cfg: RunConfig, device: str, replica: int, replicas: int,
                   reduce=None) -> dict[str, float]:
    model = model.to(device).eval()
    acc = EvalAccumulator()
    with torch.no_grad():
        for images, labels, *_ in build_eval_loader(cfg, replica=replica, num_replicas=replicas):
            acc.add(crop_averaged_probs(model, images.to(device)).cpu(), labels)
    totals = torch.tensor(acc.totals(), dtype=torch.float64)
    if reduce is not None:
        reduce(totals)
    return EvalAccumulator.result(totals.tolist()).as_dict()


def _eval_worker(rank: int, world: int, port: int, source: str, cfg_dict: dict, device: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, _ = load_model(source)
        result = _evaluate_part(model, from_dict(cfg_dict), device, rank, world, reduce=dist.all_reduce)
        if rank == 0:
            (Path(out) / "result.pkl").write_bytes(pickle.dumps(result))
    finally:
        dist.destroy_process_group()


# --- prediction -----------------------------------------------------------------------------------


def predict(source: str | Path, images: Sequence[str | Path], top: int = 5,
            stored_size: Optional[int] = None) -> list[dict[str, Any]]:
    """Per image: the `top` most probable classes (name, index, probability), or the error reading it.
    Images of any size are resized as evaluation sees them: shorter side to the stored size, centre crop."""
    model, meta = load_model(source)
    cfg = model.cfg
    stored = stored_size or meta.get("stored_size") or round(cfg.image_size * 256 / 224)
    classes = meta.get("classes") or []
    out = []
    for path in images:
        try:
            img = load_image(Path(path), stored)
        except Exception as e:  # Pillow raises many kinds for files that are no image
            out.append({"image": str(path), "error": f"cannot read {path} as an image ({type(e).__name__}: {e})"})
            continue
        x = T.normalise([T.center_crop(img, cfg.image_size)])
        with torch.no_grad():
            probs = torch.softmax(model(x).float(), dim=1)[0]
        p, idx = probs.topk(min(top, probs.numel()))
        out.append({"image": str(path), "top": [
            {"class": classes[i] if i < len(classes) else str(i), "index": i, "probability": float(q)}
            for q, i in zip(p.tolist(), idx.tolist())]})
    return out


def eval_config(args, extra: Sequence[str]) -> RunConfig:
    """The data side of an evaluation: preset, YAML and settings as for a run."""
    return load_config(args.preset, args.config, parse_override_args(list(extra)), check_data=False)
