"""The network's weights on disk, keyed by the paper's layer names — never by rank or layout.

A checkpoint directory holds one safetensors file per part of the network (`towers.0.conv1`,
`towers.1.fc6`, …, `fc8`), each with that part's `weight` and `bias` and, when the optimizer state
was saved, their SGD momentum (`momentum.weight`, `momentum.bias`). Whatever (P, T, D) wrote them,
any layout reads the parts it holds (cluster/checkpoint.py); a part is written by exactly one rank,
to a temporary name and renamed, so a file is whole or absent. Where a pipeline cut splits a tower's
part by output channels, each stage writes its rows as a piece (`towers.0.conv3[0:52]`, …
`towers.0.conv3[52:192]`) and readers join the pieces, so any cut reads any other's rows.

An exported model is one safetensors file: the single-process network's state dict plus metadata
(the model config, the class names, the step), loaded by `AlexNet.from_pretrained(path)`.
"""

from __future__ import annotations

import errno
import json
import os
import re
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


_PIECE = re.compile(r"^(.*)\[(\d+):(\d+)\]$")


def piece_of(part: str) -> tuple[str, Optional[tuple[int, int]]]:
    """"towers.0.conv3[0:52]" → ("towers.0.conv3", (0, 52)); a whole part → (part, None)."""
    m = _PIECE.match(part)
    return (m.group(1), (int(m.group(2)), int(m.group(3)))) if m else (part, None)


def _join(pieces: list[tuple[tuple[int, int], torch.Tensor]], what: str) -> torch.Tensor:
    """Row pieces [(rows, tensor)] of one tensor, joined; CheckpointError when rows are missing or twice."""
    pieces = sorted(pieces, key=lambda p: p[0])
    end = 0
    for (lo, hi), t in pieces:
        if lo != end or t.shape[0] != hi - lo:
            have = ", ".join(f"{a}:{b}" for (a, b), _ in pieces)
            raise CheckpointError(f"{what}: its pieces hold rows {have}, not one run of rows from 0")
        end = hi
    return torch.cat([t for _, t in pieces]) if len(pieces) > 1 else pieces[0][1]


def join_pieces(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict whose tensors may come in row pieces ("towers.0.conv3[0:52].weight", …) with each
    set of pieces joined into the whole tensor ("towers.0.conv3.weight")."""
    out: dict[str, torch.Tensor] = {}
    pieces: dict[str, list[tuple[tuple[int, int], torch.Tensor]]] = {}
    for key, t in tensors.items():
        part, leaf = part_of(key)
        base, rows = piece_of(part)
        if rows is None:
            out[key] = t
        else:
            pieces.setdefault(f"{base}.{leaf}", []).append((rows, t))
    for key, found in pieces.items():
        out[key] = _join(found, key)
    return out


def _part_files(directory: Path, part: str) -> list[tuple[Optional[tuple[int, int]], Path]]:
    """The files holding `part`: the whole part's, else its pieces' (written by a cut that split it)."""
    whole = part_path(directory, part)
    if whole.exists():
        return [(None, whole)]
    out = []
    for path in directory.glob("*.safetensors"):
        base, rows = piece_of(path.name[: -len(".safetensors")])
        if base == part and rows is not None:
            out.append((rows, path))
    if not out:
        raise CheckpointError(f"{whole}: missing (the checkpoint lacks part {part})")
    return sorted(out)


def _read_part(directory: Path, part: str, leaves: Iterable[str], momentum: bool) -> dict[str, torch.Tensor]:
    """leaf (and "momentum." + leaf, when saved) → the whole part's tensor, pieces joined."""
    found: dict[str, list[tuple[tuple[int, int], torch.Tensor]]] = {}
    for rows, path in _part_files(directory, part):
        try:
            with safe_open(str(path), framework="pt") as f:
                names = set(f.keys())
                for leaf in leaves:
                    for name in (leaf, MOMENTUM + leaf) if momentum and MOMENTUM + leaf in names else (leaf,):
                        t = f.get_tensor(name)
                        found.setdefault(name, []).append((rows or (0, t.shape[0]), t))
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e}); the file is truncated or "
                                  "corrupt") from None
    return {name: _join(pieces, f"{directory / part}.{name}") for name, pieces in found.items()}


def read_parts(directory: str | Path, keys: Iterable[str], momentum: bool) -> dict[str, torch.Tensor]:
    """The tensors of `keys` (state-dict keys, or a piece's: "towers.0.conv3[0:52].weight"), and with
    `momentum` their "momentum." entries, read from the parts, or the parts' pieces, that hold them. A
    missing, truncated or corrupt part, or pieces that leave rows out, is a CheckpointError naming it."""
    directory = Path(directory)
    wanted: dict[str, list[tuple[str, str, Optional[tuple[int, int]]]]] = {}
    for key in keys:
        part, leaf = part_of(key)
        base, rows = piece_of(part)
        wanted.setdefault(base, []).append((key, leaf, rows))
    out: dict[str, torch.Tensor] = {}
    for base, entries in wanted.items():
        whole = _read_part(directory, base, {leaf for _, leaf, _ in entries}, momentum)
        for key, leaf, rows in entries:
            for name, prefix in ((leaf, ""), (MOMENTUM + leaf, MOMENTUM)):
                if name in whole:
                    out[prefix + key] = whole[name] if rows is None else whole[name][rows[0]:rows[1]]
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
