"""From a scaling sweep's runs to its report's rows: each measured layout's prediction by the cost
model (with the background and the engine CPU the runs before it measured, never its own), the rounds
of a configuration combined into one row, the ratios to the baselines, and the GPU counts this
machine lacks, predicted on assumed profiles."""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

from alexnet_pp.config import ModelConfig, RunConfig
from alexnet_pp.errors import ConfigError

GPU_PROFILES = ("h100-nvlink", "h100-ib")


class SweepView(Protocol):
    """What the rows and the report need of a running sweep (scaling.Sweep)."""

    args: argparse.Namespace
    argv: list[str]
    out: Path
    base: RunConfig
    batch: int
    cpu_ratios: dict[str, Optional[float]]  # compute_cpu_ratio, by row id

    @property
    def model(self) -> ModelConfig: ...

    def settings(self) -> dict[str, Any]: ...

    def profile(self, row: dict[str, Any]) -> Any: ...


def background_of(earlier: Sequence[dict[str, Any]], workers: int) -> Optional[dict[str, Any]]:
    """What else took the shared cores while layouts ran, from runs this sweep finished before the
    one to predict (never from that run): the medians over those at the same worker count, else over
    all of them, of the cores outside the ranks' processes (Ray's daemons, the training controller)
    and of each rank's threads beside its schedule thread (communication, Ray's core worker).
    None before any run measured them (one from an older sweep, or a machine without /proc/stat)."""
    measured = [r for r in earlier if r["kind"] in ("engine", "ds-default") and r.get("status") == "ok"
                and r.get("outside_ranks_cores") is not None and r.get("cpu_share")]
    use = [r for r in measured if r["workers"] == workers] or measured
    if not use:
        return None
    return {"cores": statistics.median(r["outside_ranks_cores"] for r in use),
            "cores_per_rank": statistics.median(map(other_threads_cores, use)), "runs": len(use)}


def cpu_ratio_of(sweep: SweepView, earlier: Sequence[dict[str, Any]], workers: int,
                 tp: Optional[int] = None) -> Optional[dict[str, Any]]:
    """How much more CPU a pass's forward and backward cost in this sweep's runs at `workers` than
    calibrated: the median over the runs before the one to predict (never that run) of each run's
    compute_cpu_ratio. Only runs at the same worker count: the engine's overheads and the caches the
    other ranks fill change with it. With `tp`, only the runs with as many towers where there are
    any: a tower rank's halves of the FC layers cost more than the half of a whole layer the model
    charges (measured: 1.2–1.7× in 2×2×1's second stage, where 1×1×4's passes took 0.9–1.05×). None before
    any such run recorded its phases' CPU."""
    ratios = [(r["tp"], x) for r in earlier if r["kind"] in ("engine", "ds-default") and r.get("status") == "ok"
              and r["workers"] == workers and (x := compute_cpu_ratio(sweep, r)) is not None]
    ratios = [x for t, x in ratios if t == tp] or [x for _, x in ratios]
    if not ratios:
        return None
    return {"ratio": statistics.median(ratios), "runs": len(ratios)}


def run_candidate(sweep: SweepView, row: dict[str, Any]):
    """The layout a measured row ran, at the cut it trained on (the engine's live check may move the
    layout's first cut), so the error is the cost model's, not a different choice of cut."""
    from alexnet_pp.planning.costmodel import Candidate

    partition = row.get("cut") or ("parameters" if row["kind"] == "ds-default" else sweep.args.partition)
    return Candidate(row["pp"], row["tp"], row["dp"], row["micro_batches"], row["batch"], "1f1b", partition)


def compute_cpu_ratio(sweep: SweepView, row: dict[str, Any]) -> Optional[float]:
    """A run's schedule threads' CPU in its forward and backward phases (per rank of each stage, summed
    over the stages) over the CPU the cost model charges them from the run's calibration alone, at its
    cut: engine overheads, caches other processes filled and time slicing, which a calibration cannot
    see. None without phase CPU (a run from before it was recorded) or a calibration."""
    from alexnet_pp.planning.costmodel import predict

    if not row.get("phases_cpu_s"):
        return None
    key = row.get("id")
    if key in sweep.cpu_ratios:
        return sweep.cpu_ratios[key]
    ratio = None
    profile = sweep.profile(row)
    if profile is not None and profile.cores:
        profile = dataclasses.replace(profile, time_slicing_slowdown=1.0, engine_cpu_ratio=0.0)
        try:
            pred = predict(sweep.model, profile, run_candidate(sweep, row), flat_grads=sweep.base.parallel.flat_grads)
        except (ValueError, ConfigError):
            pred = None
        if pred is not None:
            charged = sum(sp.cpu.get("forward", 0.0) + sp.cpu.get("backward", 0.0) for sp in pred.stages)
            measured = sum(sum(row["phases_cpu_s"].get(str(sp.stage), {}).get(k, 0.0)
                               for k in ("forward", "backward", "backward_weight")) for sp in pred.stages)
            ratio = measured / charged if charged > 0 and measured > 0 else None
    if key is not None:
        sweep.cpu_ratios[key] = ratio
    return ratio


def charged_cores(background: dict[str, Any], workers: int) -> float:
    """The cores a background (background_of) takes from a run of `workers` ranks, as the cost model
    charges them (costmodel.available_cores)."""
    return background["cores"] + workers * background["cores_per_rank"]


def other_threads_cores(r: dict[str, Any]) -> float:
    """Cores' worth of CPU of a rank's threads beside its schedule thread, the mean over the stages."""
    return statistics.fmean(v["other_threads"] for v in r["cpu_share"].values())


def predict_row(sweep: SweepView, row: dict[str, Any], background: Optional[dict[str, Any]] = None,
                cpu_ratio: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The cost model's numbers for a measured layout row (W's profile, with `background`'s share of
    the cores taken and `cpu_ratio`'s engine CPU charged when given; bytes need none)."""
    from alexnet_pp.planning.costmodel import predict

    from alexnet_pp.planning.profile import assumed_gpu_profile

    profile = sweep.profile(row)
    if profile is not None and background is not None:
        profile = dataclasses.replace(profile, background_cores=background["cores"],
                                      background_cores_per_rank=background["cores_per_rank"])
    if profile is not None and cpu_ratio is not None:
        profile = dataclasses.replace(profile, engine_cpu_ratio=cpu_ratio["ratio"])
    cand = run_candidate(sweep, row)
    try:  # without a calibration (--no-predict) only the bytes, which no profile changes
        pred = predict(sweep.model, profile or assumed_gpu_profile(GPU_PROFILES[0], sweep.model), cand,
                       flat_grads=sweep.base.parallel.flat_grads)
    except (ValueError, ConfigError) as e:
        return {"prediction_error_text": str(e)}
    traffic = {"bytes_stages": pred.bytes_per_step["stages"], "bytes_towers": pred.bytes_per_step["towers"],
               "bytes_replicas": pred.bytes_per_step["replicas"]}
    if profile is None:
        return traffic
    out = {**traffic, "predicted_images_per_s": pred.images_per_s, "predicted_step_s": pred.step_seconds,
           "predicted_bounds": list(pred.bounds), "predicted_cut": pred.cut.cut_points(row["tp"]),
           "predicted_extrapolated": pred.extrapolated,
           "predicted_bubble": {str(s.stage): s.bubble for s in pred.stages},
           "predicted_phases_s": {str(s.stage): {k: v for k, v in s.phases.items()} for s in pred.stages},
           "predicted_phases_cpu_s": {str(s.stage): dict(s.cpu) for s in pred.stages if s.cpu},
           "predicted_memory_bytes": pred.memory_per_worker, "profile": profile.name,
           "predicted_background": background, "predicted_cpu_ratio": cpu_ratio}
    if row.get("images_per_s"):
        out["prediction_error"] = row["images_per_s"] / pred.images_per_s - 1
    return out


def ddp_replica_bytes(model: ModelConfig, workers: int) -> int:
    """Bytes a step's gradient all-reduce moves over the whole job (ring: 2(D − 1) × the gradients),
    as the cost model counts replica traffic; computed from the parameter count."""
    from alexnet_pp.model import AlexNet

    params = sum(p.numel() for p in AlexNet(model).parameters())
    return 2 * (workers - 1) * 4 * params


def with_predictions(sweep: SweepView, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each measured layout's row with its prediction from its calibrations and the background the
    runs before it measured (`rows` in the order they ran)."""
    out: list[dict[str, Any]] = []
    for r in rows:
        out.append(with_prediction(sweep, r, out))
    return out


def with_prediction(sweep: SweepView, row: dict[str, Any], earlier: Sequence[dict[str, Any]]) -> dict[str, Any]:
    if row["kind"] not in ("engine", "ds-default"):
        return row
    return {**row, **predict_row(sweep, row, background_of(earlier, row["workers"]),
                                 cpu_ratio_of(sweep, earlier, row["workers"], row["tp"]))}


def combine_runs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration from its rounds (--repeats): images/s and predicted images/s are
    the medians over the rounds that ran, the error is the medians', and every run's figures stay
    (`images_per_s_runs`, `predicted_images_per_s_runs`, `prediction_error_runs`); the rest of the
    row (phases, bubble, memory, step times) is the run whose images/s is the median (the lower of
    the two middle ones for an even count). A configuration no round ran is its first failure."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r.get("base_id", r["id"]), []).append(r)
    out = []
    for base, runs in groups.items():
        if len(runs) == 1 and not runs[0].get("round"):
            out.append(runs[0])
            continue
        ok = sorted((r for r in runs if r.get("status") == "ok" and r.get("images_per_s")),
                    key=lambda r: r["images_per_s"])
        first = dict(ok[(len(ok) - 1) // 2] if ok else runs[0])
        first.update(id=base, label=first.get("base_label", first["label"]), runs=len(ok), runs_failed=len(runs) - len(ok))
        first.pop("round", None)
        if ok:
            ips = [r["images_per_s"] for r in ok]
            first.update(images_per_s=statistics.median(ips), images_per_s_runs=ips)
            pred = [r["predicted_images_per_s"] for r in ok if r.get("predicted_images_per_s")]
            if len(pred) == len(ok):
                first.update(predicted_images_per_s=statistics.median(pred), predicted_images_per_s_runs=pred,
                             prediction_error=statistics.median(ips) / statistics.median(pred) - 1,
                             prediction_error_runs=[r["prediction_error"] for r in ok])
        if first["kind"] == "calibration":
            first["profiles"] = [r["profile"] for r in runs if r.get("profile")]
        out.append(first)
    return out


def derive(sweep: SweepView, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows (predicted, one per configuration) with efficiencies and the ratios to the baselines filled in."""
    ok = [r for r in rows if r.get("status") == "ok"]
    by_kind: dict[tuple[str, int], dict[str, Any]] = {(r["kind"], r["workers"]): r for r in ok if r["kind"] in ("plain", "ddp")}
    ds = {(r["pp"], r["tp"], r["dp"], r["micro_batches"]): r for r in ok if r["kind"] == "ds-default"}
    one = next((r for r in ok if r["kind"] == "engine" and r["workers"] == 1), None)
    replica_bytes: dict[int, int] = {}
    out = []
    for r in rows:
        r = dict(r)
        if r.get("status") != "ok" or not r.get("images_per_s"):
            out.append(r)
            continue
        ips, w = r["images_per_s"], r["workers"]
        ref = {"engine": one, "ds-default": one, "plain": by_kind.get(("plain", 1)),
               "ddp": by_kind.get(("ddp", 1)) or by_kind.get(("plain", 1))}.get(r["kind"])
        if ref and ref.get("images_per_s"):
            r["efficiency"] = ips / (w * ref["images_per_s"])
        for name, base in (("plain", by_kind.get(("plain", w))), ("ddp", by_kind.get(("ddp", w)))):
            if base and base is not r and base.get("images_per_s"):
                r[f"{name}_images_per_s"] = base["images_per_s"]
                r[f"vs_{name}"] = ips / base["images_per_s"]
        if r["kind"] == "engine" and r["pp"] > 1:
            base = ds.get((r["pp"], r["tp"], r["dp"], r["micro_batches"]))
            if base:
                r["ds_default_images_per_s"] = base["images_per_s"]
                r["vs_ds_default"] = ips / base["images_per_s"]
        if r["kind"] == "ddp":
            if w not in replica_bytes:
                replica_bytes[w] = ddp_replica_bytes(sweep.model, w)
            r.update(bytes_stages=0, bytes_towers=0, bytes_replicas=replica_bytes[w])
        if r["kind"] == "plain":
            r.update(bytes_stages=0, bytes_towers=0, bytes_replicas=0)
        peaks = r.get("peak_memory_bytes") or {}
        if peaks:
            r["peak_memory_max_bytes"] = max(peaks.values())
        out.append(r)
    return out


def gpu_predictions(worker_counts: Sequence[int], per_worker: int, min_micro_batch: int) -> list[dict[str, Any]]:
    """PREDICTED rows for GPU counts this machine lacks: the paper network at `per_worker` images per
    GPU (weak scaling), the best layout the planner finds and the data-parallel-only layout, on the
    assumed H100 profiles (alexnet_pp.planning.profile.assumed_gpu_profile)."""
    from alexnet_pp.planning.costmodel import Candidate, predict
    from alexnet_pp.planning.planner import rank_layouts
    from alexnet_pp.planning.profile import assumed_gpu_profile

    model = ModelConfig()
    rows = []
    for name in GPU_PROFILES:
        profile = assumed_gpu_profile(name, model)
        base = None
        for w in sorted({1, *worker_counts}):
            batch = per_worker * w
            best = rank_layouts(model, profile, w, batch, ("1f1b",), None, "measured", min(min_micro_batch, per_worker))[0]
            dp_only = predict(model, profile, Candidate(1, 1, w, 1, batch))
            base = base or best.images_per_s
            L = best.layout
            rows.append({"id": f"predicted-gpu:{name}:W{w}", "kind": "predicted-gpu", "status": "predicted",
                         "profile": name, "workers": w, "batch": batch, "pp": L.pp, "tp": L.tp, "dp": L.dp,
                         "micro_batches": L.micro_batches, "micro_batch": L.micro_batch,
                         "predicted_images_per_s": best.images_per_s, "predicted_step_s": best.step_seconds,
                         "predicted_efficiency": best.images_per_s / (w * base), "predicted_bubble_max": best.bubble,
                         "predicted_memory_bytes": best.memory_per_worker, "fits": best.fits,
                         "dp_only_images_per_s": dp_only.images_per_s,
                         "bytes_stages": best.bytes_per_step["stages"], "bytes_towers": best.bytes_per_step["towers"],
                         "bytes_replicas": best.bytes_per_step["replicas"]})
    return rows


def background_cores(r: dict[str, Any]) -> Optional[float]:
    """A run's CPU outside its ranks' schedule threads: outside their processes, and their other threads."""
    if r.get("outside_ranks_cores") is None or not r.get("cpu_share"):
        return None
    return r["outside_ranks_cores"] + r["workers"] * other_threads_cores(r)
