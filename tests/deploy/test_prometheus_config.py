"""deploy/prometheus and deploy/grafana: valid for the real tools, and consistent with cluster/metrics.py.

Static checks run `promtool` (config, rules, and rule unit tests that make each alert fire and stay
quiet); the dashboard may only select metrics the exporter defines. The e2e test starts a real
Prometheus that finds four exporters (stage, tower) ∈ {0,1}² through the driver's HTTP service
discovery, and evaluates every dashboard expression and alert against it.
"""

from __future__ import annotations

import json

import random
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from cluster.discovery import DiscoveryServer, register_endpoint
from alexnet_pp.layout import Coord
from cluster.metrics import SPECS, WorkerMetrics, sample_names
from cluster.timing import StepStats
from tests.prometheus_server import (PrometheusServer, assert_dashboard_results, dashboard_expressions,
                                     evaluate_dashboard_expressions, metric_names, requires_prometheus,
                                     substitute_grafana_variables)

REPO = Path(__file__).resolve().parents[2]
PROM_DIR = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "alexnet-pp.json"
PROMTOOL = shutil.which("promtool")
requires_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (apt-get install -y --no-install-recommends prometheus)")



def test_metric_name_extraction():
    assert metric_names('histogram_quantile(0.9, sum by (le) (rate(a_bucket{run="$run", x=~"y"}[5m])))') == {"a_bucket"}
    assert metric_names("time() - max by (run) (b) > 900 unless on (run) (c >= d offset 5m)") == {"b", "c", "d"}
    assert metric_names("1e6 < e") == {"e"}


# --- static checks ------------------------------------------------------------------------------------


@requires_promtool
def test_promtool_check_config():
    r = subprocess.run([PROMTOOL, "check", "config", str(PROM_DIR / "prometheus.yml")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


@requires_promtool
def test_promtool_check_rules():
    r = subprocess.run([PROMTOOL, "check", "rules", str(PROM_DIR / "alerts.yml")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "6 rules found" in r.stdout + r.stderr


def all_rules() -> list[dict]:
    return [r for g in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"] for r in g["rules"]]


def alert_rules() -> list[dict]:
    return [r for r in all_rules() if "alert" in r]


def recorded_names() -> set[str]:
    return {r["record"] for r in all_rules() if "record" in r}


# Series Prometheus makes itself for every target (what alerts on scrape health select).
PROMETHEUS_OWN = {"up"}


def test_alerts_and_config_use_only_exported_metrics():
    known = sample_names() | recorded_names() | PROMETHEUS_OWN
    for rule in all_rules():
        name = rule.get("alert") or rule["record"]
        assert metric_names(rule["expr"]) <= known, (name, metric_names(rule["expr"]) - known)
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    job = cfg["scrape_configs"][0]
    assert job["honor_labels"] is True  # discovery's target labels repeat the exporters' labels
    assert job["http_sd_configs"][0]["url"].startswith("http://")
    assert cfg["rule_files"] == ["alerts.yml"]


RULE_TESTS = PROM_DIR / "alerts_test.yml"


def test_rule_unit_tests_cover_every_rule():
    """deploy/prometheus/alerts_test.yml makes every alert fire once and stay quiet at least once, and
    checks the recorded series' value."""
    tests = yaml.safe_load(RULE_TESTS.read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    cases = [c for t in tests["tests"] for c in t.get("alert_rule_test", [])]
    exprs = {e["expr"] for t in tests["tests"] for e in t.get("promql_expr_test", [])}
    for rule in alert_rules():
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in mine), rule["alert"]
        assert any(not c["exp_alerts"] for c in mine), rule["alert"]
    assert recorded_names() <= exprs


@requires_promtool
def test_alerts_fire_when_they_should():
    # promtool compares the rendered annotations too, so their templates are tested with them
    r = subprocess.run([PROMTOOL, "test", "rules", RULE_TESTS.name], cwd=PROM_DIR, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_job_throughput_is_recorded_once_and_read_by_alert_and_dashboard():
    """sum by (run) (rate(alexnet_pp_images_total[...])) is written once, as the recording rule; the
    throughput alert and the dashboard's total throughput panel read the recorded series."""
    [rule] = [r for r in all_rules() if r.get("record") == "run:alexnet_pp_images:rate5m"]
    assert " ".join(rule["expr"].split()) == "sum by (run) (rate(alexnet_pp_images_total[5m]))"
    job_rate = re.compile(r"sum\s+by\s*\(\s*run\s*\)\s*\(\s*rate\(\s*alexnet_pp_images_total")
    others = [(r["alert"], r["expr"]) for r in alert_rules()] + \
        [(t, e) for t, _, e in dashboard_expressions(load_dashboard())]
    for name, expr in others:
        assert not job_rate.search(expr), (name, expr)
    [drop] = [r for r in alert_rules() if r["alert"] == "AlexnetPPThroughputDropped"]
    assert "run:alexnet_pp_images:rate5m" in metric_names(drop["expr"])
    total = [e for t, _, e in dashboard_expressions(load_dashboard()) if t == "Throughput: total images/s"]
    assert total and all(metric_names(e) == {"run:alexnet_pp_images:rate5m"} for e in total)


def test_every_alert_waits_before_firing_and_targets_going_down_alert():
    """A condition must hold for a while before it pages (a `for:`), except the restart alert, whose
    condition already spans 15 minutes of history; scrape failures of listed targets alert."""
    for rule in alert_rules():
        if rule["alert"] != "AlexnetPPWorkerRestarted":
            assert "for" in rule, rule["alert"]
    [down] = [r for r in alert_rules() if r["alert"] == "AlexnetPPTargetDown"]
    assert metric_names(down["expr"]) == {"up"} and 'job="alexnet-pp"' in down["expr"]
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    assert cfg["scrape_configs"][0]["job_name"] == "alexnet-pp"  # the job the alert selects


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_is_valid_and_selects_only_exported_metrics():
    dash = load_dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert "run" in variables and "alexnet_pp_" in json.dumps(variables["run"]["query"])
    exprs = dashboard_expressions(dash)
    assert len(exprs) >= 14
    known = sample_names() | recorded_names()
    used: set[str] = set()
    for title, ref, expr in exprs:
        names = metric_names(expr)
        assert names, (title, expr)
        assert names <= known, (title, ref, names - known)
        assert 'run="$run"' in expr, (title, expr)  # every selector of the panel is per run
        assert expr.count("{") == expr.count('run="$run"'), (title, expr)
        used |= names
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(t for t, _, _ in exprs).lower()
    for needed in ("images/s", "per replica", "p50 / p95", "bubble", "phase", "data wait", "loss", "learning rate",
                   "accuracy", "memory", "gpu", "skipped", "restarts"):
        assert needed in titles, needed
    # every family the exporter defines is on the dashboard (histograms through one of their series), and
    # of the standard process collector the resident memory
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in sample_names(SPECS)}
    families.add("process_resident_memory_bytes")
    assert families <= {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}


def test_grafana_provisioning_files():
    prov = REPO / "deploy" / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["jsonData"]["timeInterval"] == "5s"
    dash = yaml.safe_load((prov / "dashboards" / "alexnet-pp.yml").read_text())["providers"][0]
    assert dash["type"] == "file" and dash["options"]["path"]


def test_grafana_variable_substitution():
    v = {"run": "r1", "__rate_interval": "30s", "runner": "no"}
    assert substitute_grafana_variables('a{run="$run"}[$__rate_interval] ${run} [[run]] $runner', v) == \
        'a{run="r1"}[30s] r1 r1 no'


# --- end to end: a real Prometheus scraping four exporters found through discovery --------------------


def realistic_stats(step: int, stage: int, rng: random.Random) -> StepStats:
    seconds = rng.uniform(0.18, 0.3)
    fwd, bwd = 0.2 * seconds, 0.4 * seconds
    data_wait = 0.03 * seconds if stage == 0 else 0.0
    opt = 0.05 * seconds
    idle = seconds - opt - fwd - bwd - data_wait
    phases = {"forward": fwd, "backward": bwd, "data_wait": data_wait, "optimizer": opt, "send": 0.02 * seconds,
              "recv": 0.03 * seconds, "idle": idle}
    return StepStats(step, 0, 2.3 / (1 + 0.01 * step), 0.01, 64, seconds, phases, idle / (seconds - opt), 0.2,
                     total_steps=10_000,
                     cpu={"main_thread": 0.6 * seconds, "process": 0.7 * seconds, "host_busy": 1.8 * seconds},
                     phase_cpu={"forward": 0.75 * fwd, "backward": 0.75 * bwd, "send": 0.001, "recv": 0.001})


class FakeJob:
    """Four exporters of a P=2, T=2, D=1 job, stepping every `period` seconds in a thread."""

    def __init__(self, run_dir: Path, run: str, period: float = 0.2):
        self.coords = [Coord(stage * 2 + tower, stage, tower, 0) for stage in (0, 1) for tower in (0, 1)]
        self.workers = [WorkerMetrics(run, c, node="127.0.0.1", host="127.0.0.1", port=0, replicas=1, restarts=1)
                        for c in self.coords]
        self.run_dir, self.run, self.period = run_dir, run, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        for w in self.workers:
            host, port = w.start()
            register_endpoint(self.run_dir, "job-1", 2, w.coord, self.run, host, port, node=w.node)
            w.on_eval({"top1": 0.31, "top5": 0.62, "val_loss": 2.0})
            w.checkpoint(0.8)
        self._thread.start()

    def _loop(self) -> None:
        rng, step, skips = random.Random(0), 0, 0
        while not self._stop.wait(self.period):
            step += 1
            skips += step % 3 == 0
            for w in self.workers:
                w.on_step(realistic_stats(step, w.coord.stage, rng))
                w.set_skips({"decode": skips, "truncated": step // 10})

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for w in self.workers:
            w.close()


def e2e_prometheus_config(sd_url: str) -> str:
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())  # the shipped config, faster
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(PROM_DIR / "alerts.yml")]
    sd = cfg["scrape_configs"][0]["http_sd_configs"][0]
    sd.update(url=sd_url, refresh_interval="1s")
    return yaml.safe_dump(cfg)


@pytest.mark.e2e
@requires_prometheus
def test_every_dashboard_expression_returns_data_from_a_real_prometheus(tmp_path):
    run = "e2e-run"
    job = FakeJob(tmp_path / "run", run)
    sd = DiscoveryServer(tmp_path / "run", run, host="127.0.0.1", port=0, job="job-1", refresh_s=0.5)
    try:
        job.start()
        sd.start()
        with PrometheusServer(e2e_prometheus_config(sd.url), tmp_path / "prom") as prom:
            prom.wait_for('count(up{job="alexnet-pp"} == 1) == 4', timeout=60)
            # enough samples of every worker for rate() over the dashboard's windows
            prom.wait_for(f'count(count_over_time(alexnet_pp_step{{run="{run}"}}[1m]) >= 4) == 4', timeout=60)
            targets = prom.targets()
            assert sorted(t["labels"]["rank"] for t in targets) == ["0", "1", "2", "3"]
            assert not prom.query('{__name__=~"alexnet_pp_.+", exported_stage!=""}')  # honor_labels works

            results = evaluate_dashboard_expressions(prom.url, load_dashboard(), run, rate_interval="30s")
            assert results
            assert_dashboard_results(results, run)

            # spot values: one replica, 64 images per step every ~0.2 s
            # (a short window: rate() divides by the whole window, and these series are seconds old)
            ips = float(prom.query(f'sum(rate(alexnet_pp_images_total{{run="{run}"}}[4s]))')[0]["value"][1])
            assert 64 / 0.6 < ips < 64 / 0.1
            assert float(prom.query(f'max(alexnet_pp_worker_restarts{{run="{run}"}})')[0]["value"][1]) == 1
            share = [r for r in results if r.panel == "Core share of each compute phase"]
            assert share and all(float(x["value"][1]) == pytest.approx(0.75) for x in share[0].result)

            # the rules load and evaluate cleanly against live data
            groups = prom.api("rules")["groups"]
            assert {r["name"] for g in groups for r in g["rules"]} == \
                {r.get("alert") or r["record"] for r in all_rules()}
            assert all(r["health"] in ("ok", "unknown") for g in groups for r in g["rules"]), groups
            for rule in all_rules():
                prom.query(rule["expr"])  # raises on an error
            assert not [a for a in prom.api("alerts")["alerts"] if a["labels"]["alertname"] == "AlexnetPPTargetDown"]
    finally:
        sd.close()
        job.close()
