"""`alexnet-pp bench engine --figure PATH` (comparison 4): the measured pipeline timelines of 1F1B and
ZB-H1 side by side, every rank's instructions of one step coloured by phase (matplotlib, off-screen).

The input is what the engine recorded (cluster/timing.py: `InstructionTimer.last_step`, returned as
`RankResult.timeline`): per instruction its phase and perf_counter start and end, one clock for every
process of a machine, so the ranks of a local run line up without correction. Each run is shifted so
that its earliest instruction starts at 0. Compute bars carry their micro-batch's number: the k-th
forward, backward or weight pass of a step on a stage is micro-batch k in every schedule here.
"""

from __future__ import annotations

from typing import Sequence

COLOURS = {
    "forward": "#4c72b0", "backward": "#dd8452", "backward_weight": "#55a868", "send": "#c9c9c9",
    "recv": "#8c8c8c", "data_wait": "#937860", "optimizer": "#c44e52",
}
LABELS = {"forward": "F (forward)",
          "backward": "B (input gradient; whole backward in 1F1B and on ZB-H1's first stage)",
          "backward_weight": "W (weight gradient)", "send": "send", "recv": "recv", "data_wait": "load",
          "optimizer": "reduce + optimizer"}


def _bars(ax, timeline: dict, t0: float) -> float:
    """Draw one run (rank → (stage, events)); returns its length in seconds."""
    end = 0.0
    ranks = sorted(timeline)
    for row, rank in enumerate(ranks):
        stage, events = timeline[rank]
        counts: dict[str, int] = {}
        for e in events:
            colour = COLOURS.get(e["phase"])
            if colour is None:
                continue
            start, width = e["start"] - t0, e["end"] - e["start"]
            ax.barh(row, width, left=start, height=0.8, color=colour, edgecolor="white", linewidth=0.3)
            end = max(end, start + width)
            if e["phase"] in ("forward", "backward", "backward_weight"):
                k = counts[e["phase"]] = counts.get(e["phase"], -1) + 1
                ax.text(start + width / 2, row, str(k), ha="center", va="center", fontsize=6, color="white",
                        clip_on=True)
    ax.set_yticks(range(len(ranks)), [f"stage {timeline[r][0]} (rank {r})" for r in ranks], fontsize=8)
    ax.invert_yaxis()
    return end


def plot_timelines(runs: Sequence[tuple[int, int, dict, dict]], path: str, title: str = "") -> None:
    """`runs`: (P, M, 1F1B timeline, ZB-H1 timeline) per configuration; one row each, the two
    schedules side by side on one time axis."""
    from matplotlib.patches import Patch  # no backend chosen by this import; _plt() sets Agg

    from cluster.bench.plots import _plt

    plt = _plt()

    fig, axes = plt.subplots(len(runs), 2, figsize=(16, 1.2 + 1.0 * sum(max(2, p) for p, *_ in runs)),
                             squeeze=False, gridspec_kw={"height_ratios": [max(2, p) for p, *_ in runs]})
    for (pp, m, one_f, zb), row in zip(runs, axes):
        spans = []
        for ax, name, timeline in ((row[0], "1F1B", one_f), (row[1], "ZB-H1", zb)):
            t0 = min(e["start"] for _, events in timeline.values() for e in events)
            spans.append(_bars(ax, timeline, t0))
            ax.set_title(f"{name}, P = {pp}, M = {m}: step {spans[-1]:.2f} s", fontsize=9)
            ax.set_xlabel("seconds since the step's first instruction", fontsize=8)
            ax.tick_params(axis="x", labelsize=8)
        for ax in row:
            ax.set_xlim(0, max(spans) * 1.01)
    handles = [Patch(color=c, label=LABELS[p]) for p, c in COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
