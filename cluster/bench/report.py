"""The one output format of every `alexnet-pp bench` command.

A benchmark run writes, under its `--out` directory (default `runs/bench/<name>`):

    <name>.json   {"benchmark", "command", "environment", "settings", "rows", "notes"}
    <name>.csv    the rows, one per line; nested fields flattened with dots (`phases_s.0.forward`)
    <name>.md     title, the exact command, machine and library versions, the tables, the notes

`environment()` records the machine (CPU model, cores, memory, GPUs, load average when the run
started: the machine may be shared) and the versions of Python, torch, DeepSpeed, Ray, numpy and of
this repository (its git commit when it is a checkout).
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from alexnet_pp.host import cores

REPO_ROOT = Path(__file__).resolve().parents[2]


# --- the machine --------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _gpus() -> list[str]:
    try:
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch, no driver
        return []


def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def git_commit(root: Path = REPO_ROOT) -> Optional[str]:
    """The checkout's commit, with `-dirty` when tracked files differ from it; None outside a checkout."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory = math.nan
    gpus = _gpus()
    env = {
        "machine": machine_name(cpu_model(), cores(), gpus),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores": cores(),
        "memory_gib": round(memory, 1),
        "gpus": gpus,
        "load_average_at_start": load_average(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in ("torch", "deepspeed", "ray", "numpy", "alexnet-pp")},
        "commit": git_commit(),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return env


def machine_name(cpu: str, n_cores: int, gpus: Sequence[str] = ()) -> str:
    """A short name for a results folder: `intel-xeon-2cores`, `nvidia-h100-80gb-hbm3-x8`."""
    if gpus:
        base, count = gpus[0], f"x{len(gpus)}"
    else:
        base, count = cpu, f"{n_cores}cores"
    base = re.sub(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*$", " ", base.lower())
    slug = re.sub(r"[^a-z0-9]+", "-", base).strip("-") or "machine"
    return f"{slug}-{count}"


def command_line(benchmark: str, argv: Sequence[str]) -> str:
    return shlex.join(["alexnet-pp", "bench", benchmark, *argv])


# --- rows and tables ----------------------------------------------------------------------------

def flatten(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": [1, 2]} → {"a.b": 1, "c": "[1, 2]"}: one CSV column per leaf."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


Getter = Union[str, Callable[[dict[str, Any]], Any]]


@dataclass
class Column:
    """One Markdown column: a header, the row's key (or a function of the row) and a format."""

    header: str
    key: Getter
    fmt: str = ""

    def cell(self, row: dict[str, Any]) -> str:
        try:
            value = self.key(row) if callable(self.key) else row.get(self.key)
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            value = None
        return fmt_value(value, self.fmt)


def fmt_value(value: Any, spec: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if spec and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def markdown_table(rows: Iterable[dict[str, Any]], columns: Sequence[Column]) -> str:
    lines = ["| " + " | ".join(c.header for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(c.cell(row).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines)


@dataclass
class Table:
    title: str
    rows: list[dict[str, Any]]
    columns: list[Column]
    intro: str = ""


@dataclass
class Report:
    """One benchmark run's results: `add` rows, then `write()` the JSON, CSV and Markdown."""

    benchmark: str
    out_dir: Path
    argv: Sequence[str]
    settings: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=environment)
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    title: str = ""
    images: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption) shown in the Markdown

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)

    @property
    def command(self) -> str:
        return command_line(self.benchmark, self.argv)

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        self.rows.append(row)
        return row

    def path(self, suffix: str) -> Path:
        return self.out_dir / f"{self.benchmark}{suffix}"

    def to_dict(self) -> dict[str, Any]:
        return {"benchmark": self.benchmark, "command": self.command, "environment": self.environment,
                "settings": self.settings, "rows": self.rows, "notes": self.notes}

    def write(self) -> list[Path]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        written = [self.path(".json"), self.path(".csv"), self.path(".md")]
        written[0].write_text(json.dumps(self.to_dict(), indent=1, default=_json_default) + "\n")
        flat = [flatten(r) for r in self.rows]
        names: list[str] = []
        for r in flat:
            names += [k for k in r if k not in names]
        with open(written[1], "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=names)
            writer.writeheader()
            for r in flat:
                writer.writerow({k: _csv_value(v) for k, v in r.items()})
        written[2].write_text(self.markdown())
        return written

    def markdown(self) -> str:
        env = self.environment
        v = env.get("versions", {})
        load = env.get("load_average_at_start")
        lines = [f"# {self.title or self.benchmark + ' benchmark'}", "",
                 f"Command: `{self.command}`", "",
                 f"Machine: `{env.get('machine')}`: {env.get('cpu')}, {env.get('cores')} cores, "
                 f"{env.get('memory_gib')} GiB" + (f", GPUs: {', '.join(env['gpus'])}" if env.get("gpus") else ", no GPU")
                 + (f"; load average at start {load[0]} / {load[1]} / {load[2]} (1 / 5 / 15 min)" if load else "") + ".",
                 "",
                 f"Versions: Python {env.get('python')}, torch {v.get('torch')}, DeepSpeed {v.get('deepspeed')}, "
                 f"Ray {v.get('ray')}, numpy {v.get('numpy')}; commit {env.get('commit') or 'n/a'}; "
                 f"{env.get('time_utc')}.", ""]
        if self.settings:
            lines += ["Settings: " + ", ".join(f"{k} = {_short(val)}" for k, val in self.settings.items()) + ".", ""]
        for t in self.tables:
            lines += [f"## {t.title}", ""]
            if t.intro:
                lines += [t.intro, ""]
            lines += [markdown_table(t.rows, t.columns) if t.rows else "(none)", ""]
        for name, caption in self.images:
            lines += [f"![{caption}]({name})", ""]
        if self.notes:
            lines += ["## Notes", ""] + [f"- {n}" for n in self.notes] + [""]
        return "\n".join(lines)


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= limit else f"{text[:limit]}… (whole in the JSON)"


def _csv_value(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return ""
    return v


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def add_out_arg(ap, benchmark: str) -> None:
    """The option every benchmark takes for where its files go."""
    ap.add_argument("--out", default=os.path.join("runs", "bench", benchmark),
                    help=f"folder for {benchmark}.json, .csv and .md (default runs/bench/{benchmark})")


def rows_from_result(result: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows and settings from a benchmark's returned dict: a list of dicts is rows; a mapping whose
    values are all mappings (`{"layouts": {"2,2,1": {...}}}`) gives a row per entry; other values
    are settings. With a `rows` list, everything else is settings."""
    if isinstance(result, list):
        return [dict(r) for r in result], {}
    rows: list[dict[str, Any]] = []
    settings: dict[str, Any] = {}
    explicit = isinstance((result or {}).get("rows"), list)
    for key, value in (result or {}).items():
        if explicit and key != "rows":
            settings[key] = value
        elif key == "rows" and isinstance(value, list):
            rows += [dict(r) for r in value]
        elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            singular = key[:-1] if key.endswith("s") else key
            rows += [{singular: k, **v} for k, v in value.items()]
        else:
            settings[key] = value
    return rows, settings
