"""The per-worker exporter and endpoint discovery, over real HTTP on 127.0.0.1.

Exporters are scraped and parsed with prometheus_client's own text parser; discovery is read the way
Prometheus reads it (http_sd JSON over HTTP, file_sd JSON on disk).
"""

from __future__ import annotations

import json
import logging
import socket
import urllib.request

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from alexnet_pp.config import RunConfig
from alexnet_pp.layout import Coord
from cluster.discovery import (DiscoveryServer, file_sd_path, read_endpoints, register_endpoint, resolve_host,
                               scrape_config, unregister_endpoint)
from cluster.metrics import LABELS, PHASES, PROCESS_NAMES, SPECS, WorkerMetrics, lead_only_names, sample_names
from cluster.timing import StepStats


def step_stats(step: int, images: int = 128, seconds: float = 0.25, bubble: float = 0.3) -> StepStats:
    phases = {"forward": 0.05, "backward": 0.1, "send": 0.01, "recv": 0.02, "data_wait": 0.01, "optimizer": 0.02,
              "idle": 0.07}
    return StepStats(step=step, epoch=0, loss=2.0 / step, lr=0.01 * step, images=images, seconds=seconds,
                     phases=phases, bubble=bubble, theoretical_bubble=0.2,
                     cpu={"main_thread": 0.6 * seconds, "process": 0.7 * seconds, "host_busy": 1.9 * seconds},
                     phase_cpu={"forward": 0.04, "backward": 0.09, "recv": 0.001})


def scrape(url: str) -> dict[str, list]:
    """sample name → [(labels, value)] of one scrape."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(samples: dict[str, list], name: str, **labels: str) -> float:
    hits = [v for lab, v in samples[name] if all(lab.get(k) == x for k, x in labels.items())]
    assert len(hits) == 1, (name, labels, samples.get(name))
    return hits[0]


@pytest.fixture
def lead():
    m = WorkerMetrics("r1", Coord(rank=0, stage=0, tower=0, replica=1), node="node-a", host="127.0.0.1", port=0,
                      replicas=2, restarts=1, total_steps=10)
    m.start()
    yield m
    m.close()


def test_exporter_serves_every_metric_with_labels(lead):
    for step in (1, 2, 3):
        lead.on_step(step_stats(step, seconds=0.1 * step))
    lead.on_eval({"step": 3, "top1": 0.25, "top5": 0.75, "val_loss": 1.5, "val_samples": 100})
    lead.set_skips({"decode": 2, "truncated": 0})
    lead.set_skips({"decode": 5})
    lead.set_skips({"decode": 1})  # a new epoch's stream counts from 0 again
    lead.checkpoint(1.25)
    lead.restarted()
    s = scrape(lead.url)

    base = {"run": "r1", "stage": "0", "tower": "0", "replica": "1", "node": "node-a"}
    for name, samples in s.items():
        for labels, _ in samples:
            if name in PROCESS_NAMES:  # the standard collector: Prometheus adds the target's labels
                assert labels == {}, (name, labels)
            else:
                assert {k: labels[k] for k in LABELS} == base, (name, labels)
    exported = {n for n in s if not n.endswith("_created")}
    assert exported == sample_names() - {"alexnet_pp_gpu_memory_allocated_bytes"}  # no CUDA here

    assert value(s, "alexnet_pp_images_total") == 3 * 128 / 2  # the replica's share of each step
    assert value(s, "alexnet_pp_step_duration_seconds_count") == 3
    assert value(s, "alexnet_pp_step_duration_seconds_sum") == pytest.approx(0.6)
    assert value(s, "alexnet_pp_step_duration_seconds_bucket", le="0.25") == 2
    assert value(s, "alexnet_pp_step_duration_seconds_bucket", le="+Inf") == 3
    assert {lab["phase"] for lab, _ in s["alexnet_pp_stage_phase_seconds_total"]} == set(PHASES)
    assert value(s, "alexnet_pp_stage_phase_seconds_total", phase="backward") == pytest.approx(0.3)
    assert value(s, "alexnet_pp_stage_phase_seconds_total", phase="idle") == pytest.approx(0.21)
    assert value(s, "alexnet_pp_data_wait_seconds_total") == pytest.approx(0.03)
    assert {lab["phase"] for lab, _ in s["alexnet_pp_stage_phase_cpu_seconds_total"]} == set(PHASES)
    assert value(s, "alexnet_pp_stage_phase_cpu_seconds_total", phase="backward") == pytest.approx(0.27)
    assert value(s, "alexnet_pp_stage_phase_cpu_seconds_total", phase="recv") == pytest.approx(0.003)
    assert value(s, "alexnet_pp_stage_phase_cpu_seconds_total", phase="idle") == 0
    assert value(s, "alexnet_pp_schedule_thread_cpu_seconds_total") == pytest.approx(0.6 * 0.6)
    assert value(s, "alexnet_pp_host_busy_cpu_seconds_total") == pytest.approx(1.9 * 0.6)
    assert value(s, "alexnet_pp_pipeline_bubble_ratio") == pytest.approx(0.3)
    assert value(s, "alexnet_pp_pipeline_bubble_theoretical_ratio") == pytest.approx(0.2)
    assert value(s, "alexnet_pp_loss") == pytest.approx(2.0 / 3)
    assert value(s, "alexnet_pp_learning_rate") == pytest.approx(0.03)
    assert value(s, "alexnet_pp_eval_top1_accuracy_ratio") == 0.25
    assert value(s, "alexnet_pp_eval_top5_accuracy_ratio") == 0.75
    assert value(s, "alexnet_pp_samples_skipped_total", kind="decode") == 6
    assert value(s, "alexnet_pp_samples_skipped_total", kind="truncated") == 0
    assert value(s, "alexnet_pp_checkpoints_total") == 1
    assert value(s, "alexnet_pp_checkpoint_duration_seconds_sum") == 1.25
    assert value(s, "alexnet_pp_worker_restarts") == 2
    assert value(s, "alexnet_pp_step") == 3
    assert value(s, "alexnet_pp_steps_planned") == 10
    assert value(s, "alexnet_pp_last_step_timestamp_seconds") > 1e9
    assert 1e6 < value(s, "process_resident_memory_bytes") < 1e12
    assert value(s, "process_cpu_seconds_total") > 0


def test_metric_names_follow_prometheus_conventions():
    """Counters, and only counters, end in _total; 0..1 values end in _ratio; nothing duplicates the
    standard process collector."""
    for spec in SPECS:
        assert spec.name.startswith("alexnet_pp_"), spec.name
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name
        if "(0..1)" in spec.help or "fraction" in spec.help:
            assert spec.name.endswith("_ratio"), spec.name
        assert not spec.name.startswith("alexnet_pp_process_"), spec.name  # process_* comes from the collector
    kinds = {s.name: s.kind for s in SPECS}
    assert kinds["alexnet_pp_worker_restarts"] == "gauge"  # starts at attempt - 1 in a new process


def test_restarts_start_at_attempt_minus_one_in_a_new_worker():
    # a restarted worker group is a new process and a new series: its first sample is already the count
    m = WorkerMetrics("r1", Coord(0, 0, 0, 0), node="n", restarts=3)
    with m:
        s = scrape(m.url)
    assert value(s, "alexnet_pp_worker_restarts") == 3
    assert "alexnet_pp_worker_restarts_total" not in s


def test_stats_dicts_are_accepted_too(lead):
    from dataclasses import asdict

    lead.on_step({**asdict(step_stats(7)), "total_steps": 20})
    s = scrape(lead.url)
    assert value(s, "alexnet_pp_step") == 7
    assert value(s, "alexnet_pp_steps_planned") == 20


def test_only_the_lead_rank_counts_images_and_skips():
    m = WorkerMetrics("r1", Coord(rank=1, stage=0, tower=1, replica=0), node="n", replicas=1)
    with m:
        m.on_step(step_stats(1))
        m.set_skips({"decode": 3})
        s = scrape(m.url)
    assert not lead_only_names() & set(s)
    assert value(s, "alexnet_pp_step") == 1
    assert value(s, "alexnet_pp_stage_phase_seconds_total", phase="forward") == pytest.approx(0.05)


def test_busy_port_falls_back_to_a_free_one(caplog):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        m = WorkerMetrics("r1", Coord(0, 0, 0, 0), node="n", host="127.0.0.1", port=port)
        with caplog.at_level(logging.WARNING, logger="cluster.metrics"):
            host, got = m.start()
        try:
            assert host == "127.0.0.1" and got != port
            assert "using a free port" in caplog.text
            assert "alexnet_pp_step" in scrape(m.url)
        finally:
            m.close()


def test_two_exporters_in_one_process_are_independent():
    a = WorkerMetrics("r1", Coord(0, 0, 0, 0), node="n")
    b = WorkerMetrics("r1", Coord(1, 0, 1, 0), node="n")
    with a, b:
        a.on_step(step_stats(5))
        assert value(scrape(a.url), "alexnet_pp_step") == 5
        assert value(scrape(b.url), "alexnet_pp_step") == 0


def test_worker_integration_registers_follows_the_callbacks_and_cleans_up(tmp_path):
    cfg = RunConfig(name="r9", out_dir=str(tmp_path))
    cfg.parallel.dp = 2
    off = RunConfig(name="r9", out_dir=str(tmp_path))
    off.metrics.enabled = False
    assert WorkerMetrics.for_worker(off, Coord(0, 0, 0, 0), "job1", 1) is None

    coord = Coord(0, 0, 0, 1)
    m = WorkerMetrics.for_worker(cfg, coord, "job1", attempt=3)
    try:
        [target] = DiscoveryServer(cfg.run_dir, "r9", job="job1").targets()
        assert target["targets"] == ["%s:%d" % m.address]
        assert target["labels"]["replica"] == "1" and target["labels"]["node"] == m.node
        stats = step_stats(1)
        stats.skip_counts, stats.total_steps = {"decode": 4}, 12  # what PipelineWorker fills in
        m.on_step(stats, coord)
        m.on_checkpoint(1, 0.5, coord)  # what PipelineWorker calls after each checkpoint
        m.on_checkpoint(2, 1.0, coord)
        s = scrape(m.url)
        assert value(s, "alexnet_pp_checkpoints_total") == 2
        assert value(s, "alexnet_pp_checkpoint_duration_seconds_sum") == pytest.approx(1.5)
        assert value(s, "alexnet_pp_samples_skipped_total", kind="decode") == 4
        assert value(s, "alexnet_pp_steps_planned") == 12
        assert value(s, "alexnet_pp_worker_restarts") == 2  # attempt 3: two restarts before it
        assert value(s, "alexnet_pp_images_total") == 64  # batch 128 over dp = 2
    finally:
        m.close()
    assert DiscoveryServer(cfg.run_dir, "r9", job="job1").targets() == []  # unregistered on close


def test_host_resolution():
    assert resolve_host("127.0.0.1") == ("127.0.0.1", "127.0.0.1")
    bind, adv = resolve_host("node")
    assert bind == adv and adv.count(".") == 3
    assert resolve_host("0.0.0.0")[0] == "0.0.0.0"


# --- discovery --------------------------------------------------------------------------------------


def http_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.headers["Content-Type"] == "application/json"
        return json.loads(r.read())


def test_discovery_serves_live_targets_of_the_newest_attempt(tmp_path):
    coords = [Coord(r, r // 2, r % 2, 0) for r in range(4)]
    regs = {c.rank: register_endpoint(tmp_path, "job1", 1, c, "r1", "127.0.0.1", 9000 + c.rank, node="n")
            for c in coords}
    register_endpoint(tmp_path / "other", "job0", 1, coords[0], "r0", "127.0.0.1", 8000)
    with DiscoveryServer(tmp_path, "r1", host="127.0.0.1", port=0, job="job1", refresh_s=0.1) as sd:
        got = http_json(sd.url)
        assert got == [{"targets": [f"127.0.0.1:{9000 + c.rank}"],
                        "labels": {"run": "r1", "stage": str(c.stage), "tower": str(c.tower), "replica": "0",
                                   "rank": str(c.rank), "node": "n"}} for c in coords]
        assert json.loads(file_sd_path(tmp_path).read_text()) == got  # file_sd: the same list

        # a worker exits cleanly: its target goes
        unregister_endpoint(*regs[3])
        assert [t["labels"]["rank"] for t in http_json(sd.url)] == ["0", "1", "2"]

        # the group restarts: the newest attempt's targets replace all older ones at once
        old0 = regs[0]
        new0 = register_endpoint(tmp_path, "job1", 2, coords[0], "r1", "127.0.0.1", 9100, node="n")
        assert http_json(sd.url) == [{"targets": ["127.0.0.1:9100"], "labels": new0[1]["labels"]}]
        unregister_endpoint(*old0)  # the old worker's late exit must not remove the new registration
        assert len(http_json(sd.url)) == 1
        sd._stop.wait(0.5)  # the file follows within refresh_s
        assert json.loads(file_sd_path(tmp_path).read_text()) == http_json(sd.url)
        assert "http_sd_configs" in sd.scrape_config()
    assert json.loads(file_sd_path(tmp_path).read_text()) == []  # driver gone: nothing to scrape


def test_discovery_without_job_serves_the_newest_job_of_the_run(tmp_path):
    register_endpoint(tmp_path, "old", 3, Coord(0, 0, 0, 0), "r1", "127.0.0.1", 1)
    register_endpoint(tmp_path, "new", 1, Coord(1, 0, 1, 0), "r1", "127.0.0.1", 2)
    assert [r["job"] for r in read_endpoints(tmp_path, "r1")] == ["new"]
    assert read_endpoints(tmp_path, "someone-else") == []
    assert read_endpoints(tmp_path / "missing", "r1") == []


def test_discovery_port_in_use_falls_back(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with DiscoveryServer(tmp_path, "r1", host="127.0.0.1", port=port) as sd:
            assert sd.address[1] != port
            assert http_json(sd.url) == []


def test_scrape_config_snippet_is_valid_yaml():
    text = scrape_config("http://10.0.0.1:9400/targets", "/runs/x/prometheus-targets.json")
    job = yaml.safe_load(text)["scrape_configs"][0]
    assert job["honor_labels"] is True
    assert job["http_sd_configs"] == [{"url": "http://10.0.0.1:9400/targets", "refresh_interval": "15s"}]
    assert "# file_sd_configs:" in text
    only_file = yaml.safe_load(scrape_config(None, "/runs/x/prometheus-targets.json"))["scrape_configs"][0]
    assert only_file["file_sd_configs"][0]["files"] == ["/runs/x/prometheus-targets.json"]
