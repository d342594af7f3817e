"""The network's weights on disk, keyed by the paper's layer names — never by rank or layout.

A checkpoint directory holds one safetensors file per part of the network (`towers.0.conv1`,
`towers.1.fc6`, …, `fc8`), each with that part's `weight` and `bias` and, when the optimizer state
was saved, their SGD momentum (`momentum.weight`, `momentum.bias`). Whatever (P, T, D) wrote them,
any layout reads the parts it holds (cluster/checkpoint.py); a part is written by exactly one rank,
to a temporary name and renamed, so a file is whole or absent.

An exported model is one safetensors file: the single-process network's state dict plus metadata
(the model config, the class names, the step), loaded by `AlexNet.from_pretrained(path)`.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file

from alexnet_pp.fileio import write_atomic

MOMENTUM = "momentum."


class CheckpointError(RuntimeError):
    """A checkpoint or model file that cannot be used; the message names the file and what differs."""


def part_of(key: str) -> tuple[str, str]:
    """"towers.0.conv1.weight" → ("towers.0.conv1", "weight")."""
    part, _, leaf = key.rpartition(".")
    return part, leaf


def part_path(directory: str | Path, part: str) -> Path:
    return Path(directory) / f"{part}.safetensors"


def write_part(directory: str | Path, part: str, tensors: dict[str, torch.Tensor]) -> int:
    """Write one part's tensors, streamed to a temporary name and renamed (a part is whole or absent);
    returns the bytes written."""
    path = part_path(directory, part)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)
    except SafetensorError as e:  # safetensors reports I/O failures (a full disk) as its own error
        tmp.unlink(missing_ok=True)
        code = errno.ENOSPC if "No space left" in str(e) else errno.EIO
        raise OSError(code, f"{os.strerror(code)} ({e})", str(tmp)) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path.stat().st_size


def read_parts(directory: str | Path, keys: Iterable[str], momentum: bool) -> dict[str, torch.Tensor]:
    """The tensors of `keys` (state-dict keys), and with `momentum` their "momentum." entries, read
    from the parts that hold them. A missing, truncated or corrupt part is a CheckpointError naming it."""
    wanted: dict[str, list[str]] = {}
    for key in keys:
        part, leaf = part_of(key)
        wanted.setdefault(part, []).append(leaf)
    out: dict[str, torch.Tensor] = {}
    for part, leaves in wanted.items():
        path = part_path(directory, part)
        try:
            with safe_open(str(path), framework="pt") as f:
                names = set(f.keys())
                for leaf in leaves:
                    out[f"{part}.{leaf}"] = f.get_tensor(leaf)
                    if momentum and MOMENTUM + leaf in names:
                        out[f"{MOMENTUM}{part}.{leaf}"] = f.get_tensor(MOMENTUM + leaf)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing (the checkpoint lacks part {part})") from None
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e}); the file is truncated or "
                                  "corrupt") from None
    return out


def check_shapes(found: dict[str, torch.Tensor], expected: dict[str, torch.Size], source: str | Path) -> None:
    """Every tensor the shape the network needs, or a CheckpointError saying which one differs."""
    for key, shape in expected.items():
        if key not in found:
            raise CheckpointError(f"{source}: has no {key}")
        if tuple(found[key].shape) != tuple(shape):
            raise CheckpointError(
                f"{source}: {key} is {tuple(found[key].shape)} but this network needs {tuple(shape)} — the "
                "file was written for another model.width, model.num_classes or model.image_size")


def check_model_compatible(saved: dict[str, Any], model: dict[str, Any], source: str | Path) -> None:
    """The settings that fix the network's shapes must agree; the message lists what differs."""
    keys = ("width", "num_classes", "image_size")
    diff = [f"model.{k}: file {saved.get(k)!r}, this run {model.get(k)!r}" for k in keys if saved.get(k) != model.get(k)]
    if diff:
        raise CheckpointError(f"{source} was written for another network ({'; '.join(diff)})")


# --- one-file export ------------------------------------------------------------------------------


def export_file(path: str | Path, state: dict[str, torch.Tensor], model_cfg: dict[str, Any],
                classes: Optional[list[str]] = None, extra: Optional[dict[str, Any]] = None) -> None:
    """The single network's state dict in one safetensors file with its config and class names."""
    meta = {"format": "alexnet-pp", "model": json.dumps(model_cfg), "classes": json.dumps(classes or []),
            **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    data = st_save({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, metadata=meta)
    write_atomic(path, data)


def read_export(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, metadata with "model", "classes", …) of an exported model; CheckpointError if it
    is not one or cannot be read."""
    path = Path(path)
    try:
        data = path.read_bytes()
        state = st_load(data)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e}); truncated or not a "
                              "safetensors file") from None
    if meta.get("format") != "alexnet-pp" or "model" not in meta:
        raise CheckpointError(f"{path}: not an alexnet-pp model (no alexnet-pp metadata); export one with "
                              "`alexnet-pp export RUN_OR_CHECKPOINT FILE`")
    return state, {k: json.loads(v) for k, v in meta.items() if k != "format"}
