"""The scaling benchmark's PNG plots (matplotlib, drawn off-screen). Each says in its title what it
shows and on which machine; axes carry units; anything predicted is marked as predicted.

- scaling.png: images/s and efficiency against workers, a line per layout family, with the plain
  trainer, DDP, DeepSpeed's partition and the predictions;
- phases.png: each stage's measured step time split into phases (stacked, ms per step);
- bubble.png: each pipeline stage's bubble, measured and simulated, against (P − 1)/(M + P − 1);
- predicted_vs_measured.png: the cost model's images/s against the measurement, with the ±15 % band;
- gpu_predicted.png: PREDICTED images/s and efficiency on GPU counts this machine lacks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PHASE_COLOURS = {"forward": "#4c78a8", "backward": "#f58518", "send": "#54a24b", "recv": "#b79a20",
                 "idle": "#d3d3d3", "data_wait": "#e45756", "optimizer": "#72b7b2"}
FAMILY_NAMES = {"": "one worker", "P": "pipeline", "T": "towers (T = 2)", "D": "data parallel",
                "PT": "pipeline × towers", "PD": "pipeline × data", "TD": "towers × data", "PTD": "P × T × D"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _family(r: dict[str, Any]) -> str:
    key = ("P" if r["pp"] > 1 else "") + ("T" if r["tp"] > 1 else "") + ("D" if r["dp"] > 1 else "")
    name = FAMILY_NAMES[key]
    return f"{name}, M = {r['micro_batches']}" if r["pp"] > 1 else name


def _ok(rows, *kinds):
    return [r for r in rows if r["kind"] in kinds and r.get("status") == "ok" and r.get("images_per_s")]


def plot_scaling(rows: list[dict[str, Any]], path: Path, subtitle: str) -> int:
    plt = _plt()
    engine = _ok(rows, "engine")
    if not _ok(rows, "engine", "ds-default", "plain", "ddp"):
        return 0
    one = next((r for r in engine if r["workers"] == 1), None)
    fig, (ax, ax_eff) = plt.subplots(1, 2, figsize=(14, 6))
    drawn = 0
    families: dict[str, list[dict[str, Any]]] = {}
    for r in engine:
        if r["workers"] > 1:
            families.setdefault(_family(r), []).append(r)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, rs) in enumerate(sorted(families.items())):
        c = colours[i % len(colours)]
        pts = sorted(([one] if one else []) + rs, key=lambda r: r["workers"])
        xs = [r["workers"] for r in pts]
        ax.plot(xs, [r["images_per_s"] for r in pts], "o-", color=c, label=f"{name} (measured)")
        ax_eff.plot(xs, [r.get("efficiency", float("nan")) for r in pts], "o-", color=c, label=name)
        pred = [r for r in pts if r.get("predicted_images_per_s")]
        if pred:
            ax.plot([r["workers"] for r in pred], [r["predicted_images_per_s"] for r in pred], "o--", color=c,
                    mfc="none", alpha=0.8, label=f"{name} (predicted)")
        drawn += len(pts)
    if one and not families:
        ax.plot([1], [one["images_per_s"]], "o", label="1×1×1 (measured)")
        drawn += 1
    for kind, style, label in (("plain", "--s", "plain trainer (1 process, W threads ≤ cores)"),
                               ("ddp", "-.^", "PyTorch DDP (W processes)")):
        rs = sorted(_ok(rows, kind), key=lambda r: r["workers"])
        if kind == "ddp":
            plain1 = next((r for r in _ok(rows, "plain") if r["workers"] == 1), None)
            rs = ([plain1] if plain1 and rs else []) + rs
        if rs:
            ax.plot([r["workers"] for r in rs], [r["images_per_s"] for r in rs], style, color="0.3" if kind == "ddp" else "k",
                    label=label)
            ax_eff.plot([r["workers"] for r in rs], [r.get("efficiency", float("nan")) for r in rs], style,
                        color="0.3" if kind == "ddp" else "k", label=label)
            drawn += len(rs)
    ds = _ok(rows, "ds-default")
    if ds:
        ax.plot([r["workers"] for r in ds], [r["images_per_s"] for r in ds], "x", color="crimson", ms=9, mew=2,
                label="DeepSpeed partition=parameters (same layouts)")
        drawn += len(ds)
    workers = sorted({r["workers"] for r in _ok(rows, "engine", "plain", "ddp", "ds-default")}) or [1]
    for a in (ax, ax_eff):
        a.set_xscale("log", base=2)
        a.set_xticks(workers)
        a.set_xticklabels([str(w) for w in workers])
        a.set_xlabel("workers (processes)")
        a.grid(True, alpha=0.3)
    ax.set_ylabel("images / s (higher is better)")
    ax.set_title("Throughput against workers")
    ax_eff.axhline(1.0, color="0.5", lw=1, ls=":", label="ideal (linear)")
    ax_eff.set_ylabel("efficiency = img/s / (W × img/s at 1 worker)")
    ax_eff.set_title("Scaling efficiency against one worker")
    ax.legend(fontsize=7, loc="best")
    ax_eff.legend(fontsize=7, loc="best")
    fig.suptitle(f"Layouts vs baselines — {subtitle}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def plot_phases(rows: list[dict[str, Any]], path: Path, subtitle: str) -> int:
    plt = _plt()
    bars = []
    for r in _ok(rows, "engine", "ds-default"):
        for stage, ph in sorted((r.get("phases_s") or {}).items()):
            bars.append((f"{r['label']} · stage {stage}", ph))
    if not bars:
        return 0
    fig, ax = plt.subplots(figsize=(11, max(3.0, 0.32 * len(bars) + 1.5)))
    ys = range(len(bars))
    left = [0.0] * len(bars)
    for phase, colour in PHASE_COLOURS.items():
        widths = [1000 * ph.get(phase, 0.0) for _, ph in bars]
        ax.barh(list(ys), widths, left=left, color=colour, label=phase.replace("_", " "), edgecolor="white", lw=0.5)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(list(ys))
    ax.set_yticklabels([b[0] for b in bars], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms per step (mean over the timed steps, one rank of the stage)")
    ax.set_title(f"Where each stage's step time goes (measured) — {subtitle}", fontsize=10)
    ax.legend(ncol=7, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08 if len(bars) > 6 else -0.2))
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return len(bars)


def plot_bubble(rows: list[dict[str, Any]], path: Path, subtitle: str) -> int:
    plt = _plt()
    items = []
    for r in _ok(rows, "engine", "ds-default"):
        if r["pp"] < 2:
            continue
        for stage, b in sorted((r.get("bubble_measured") or {}).items()):
            items.append((f"{r['label']}\nstage {stage}", b, (r.get("predicted_bubble") or {}).get(stage),
                          r.get("bubble_theory")))
    if not items:
        return 0
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(items) + 2), 5))
    xs = list(range(len(items)))
    ax.bar(xs, [i[1] for i in items], color="#4c78a8", label="measured")
    sim = [(x, i[2]) for x, i in zip(xs, items) if i[2] is not None]
    if sim:
        ax.plot([x for x, _ in sim], [v for _, v in sim], "o", color="crimson", label="simulated (cost model)")
    ax.scatter(xs, [i[3] for i in items], marker="_", s=900, color="k", lw=2, label="theory (P − 1)/(M + P − 1)")
    ax.set_xticks(xs)
    ax.set_xticklabels([i[0] for i in items], fontsize=7)
    ax.set_ylabel("bubble: idle share of the pipeline schedule")
    ax.set_ylim(0, max([0.5] + [v for i in items for v in i[1:] if v is not None]) * 1.15)
    ax.set_title(f"Pipeline bubble per stage: measured vs theory — {subtitle}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return len(items)


def plot_predicted(rows: list[dict[str, Any]], path: Path, subtitle: str, tolerance: float = 0.15) -> int:
    plt = _plt()
    pts = [r for r in _ok(rows, "engine", "ds-default") if r.get("predicted_images_per_s")]
    if not pts:
        return 0
    fig, ax = plt.subplots(figsize=(7, 6.5))
    values = [v for r in pts for v in (r["images_per_s"], r["predicted_images_per_s"])]
    # zoomed to the points: the layouts of one machine lie within a factor of two or so, and from
    # the origin they would crowd into a corner
    hi, lo = max(values) * 1.15, min(values) * 0.8
    line = [lo, hi]
    ax.plot(line, line, color="0.4", lw=1, label="measured = predicted")
    ax.fill_between(line, [x * (1 - tolerance) for x in line], [x * (1 + tolerance) for x in line], color="0.85",
                    label=f"±{100 * tolerance:.0f}%")
    colours = {"engine": "#4c78a8", "ds-default": "crimson"}
    for kind, label in (("engine", "layouts (measured cut)"), ("ds-default", "DeepSpeed partition=parameters")):
        ks = [r for r in pts if r["kind"] == kind]
        if ks:
            ax.plot([r["predicted_images_per_s"] for r in ks], [r["images_per_s"] for r in ks], "o",
                    color=colours[kind], label=label)
    # labels in a column right of the points, each at its point's height moved apart just enough to
    # stay readable, with a line to its point: layouts that run alike sit on top of each other
    order = sorted(pts, key=lambda r: r["images_per_s"])
    heights = spread([r["images_per_s"] for r in order], gap=(hi - lo) * 0.03, low=lo, high=hi)
    column = max(r["predicted_images_per_s"] for r in pts) + (hi - lo) * 0.04
    for r, y in zip(order, heights):
        ax.annotate(r["label"].replace(" DS parameters", " DS"), (r["predicted_images_per_s"], r["images_per_s"]),
                    xytext=(column, y), fontsize=7, va="center", color=colours[r["kind"]],
                    arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5})
    ax.set_xlim(lo, hi + (hi - lo) * 0.25)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("predicted images / s (cost model, profile calibrated in this run)")
    ax.set_ylabel("measured images / s")
    ax.set_title(f"Predicted vs measured — {subtitle}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return len(pts)


def spread(ys: list[float], gap: float, low: float, high: float) -> list[float]:
    """Heights for labels wanted at ascending `ys`: at least `gap` apart, in the same order, each
    as close to its own as that allows, within [low, high] where there is room."""
    out: list[float] = []
    for y in ys:  # push each up past the one below it
        out.append(max(y, out[-1] + gap) if out else max(y, low))
    over = out[-1] - high if out else 0.0
    if over > 0:  # then back down from the top, as far as the bottom allows
        out[-1] -= over
        for i in range(len(out) - 2, -1, -1):
            out[i] = min(out[i], out[i + 1] - gap)
    return out


def plot_gpu(rows: list[dict[str, Any]], path: Path, per_worker: Any) -> int:
    plt = _plt()
    gpu = [r for r in rows if r["kind"] == "predicted-gpu"]
    if not gpu:
        return 0
    fig, (ax, ax_eff) = plt.subplots(1, 2, figsize=(13, 5.5))
    drawn = 0
    for name in sorted({r["profile"] for r in gpu}):
        rs = sorted((r for r in gpu if r["profile"] == name), key=lambda r: r["workers"])
        xs = [r["workers"] for r in rs]
        (ln,) = ax.plot(xs, [r["predicted_images_per_s"] for r in rs], "o-", label=f"{name}: best layout")
        ax.plot(xs, [r["dp_only_images_per_s"] for r in rs], "s--", color=ln.get_color(), mfc="none",
                label=f"{name}: data parallel only")
        ax_eff.plot(xs, [r["predicted_efficiency"] for r in rs], "o-", color=ln.get_color(), label=name)
        for r in rs:
            ax.annotate(f"{r['pp']}×{r['tp']}×{r['dp']} M{r['micro_batches']}", (r["workers"], r["predicted_images_per_s"]),
                        fontsize=6, xytext=(3, -9), textcoords="offset points")
        drawn += len(rs)
    counts = sorted({r["workers"] for r in gpu})
    for a in (ax, ax_eff):
        a.set_xscale("log", base=2)
        a.set_xticks(counts)
        a.set_xticklabels([str(c) for c in counts])
        a.set_xlabel("GPUs")
        a.grid(True, alpha=0.3)
    ax.set_yscale("log")
    ax.set_ylabel("images / s (PREDICTED)")
    ax.set_title("Throughput (predicted)")
    ax_eff.axhline(1.0, color="0.5", ls=":", lw=1)
    ax_eff.set_ylabel("efficiency against 1 GPU (PREDICTED)")
    ax_eff.set_title("Scaling efficiency (predicted)")
    ax.legend(fontsize=7)
    ax_eff.legend(fontsize=7)
    fig.suptitle(f"PREDICTED, not measured: paper network, {per_worker} images per GPU, assumed H100 profiles",
                 fontsize=11, color="crimson")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def write_plots(rows: list[dict[str, Any]], out: Path, env: dict[str, Any], settings: dict[str, Any]) -> list[tuple[str, str]]:
    """Every plot that has data to show; [(file name, caption)] for the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    subtitle = (f"{env.get('machine')}, preset {settings.get('preset')}, batch {settings.get('batch')}, "
                f"{settings.get('threads_per_worker')} thread(s)/worker")
    made = []
    for name, caption, fn in (
            ("scaling.png", "images/s and efficiency against workers", lambda p: plot_scaling(rows, p, subtitle)),
            ("phases.png", "per-stage phase times (measured)", lambda p: plot_phases(rows, p, subtitle)),
            ("bubble.png", "bubble measured vs theory", lambda p: plot_bubble(rows, p, subtitle)),
            ("predicted_vs_measured.png", "predicted vs measured images/s", lambda p: plot_predicted(rows, p, subtitle)),
            ("gpu_predicted.png", "PREDICTED GPU scaling", lambda p: plot_gpu(rows, p, settings.get("gpu_batch_per_worker", 128)))):
        path = out / name
        if fn(path) > 0:
            made.append((name, caption))
        else:
            path.unlink(missing_ok=True)  # nothing to draw: no empty plot
    return made
