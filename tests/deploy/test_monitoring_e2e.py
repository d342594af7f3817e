"""The monitoring stack against a real job: a stock Prometheus, configured with the project's scrape
configuration, finds the four workers of a (P, T, D) = (2, 2, 1) Ray job through the driver's service
discovery, and every PromQL expression of the Grafana dashboard returns data for all four."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.prometheus_server import (PrometheusServer, assert_dashboard_results, evaluate_dashboard_expressions,
                                     free_port, requires_prometheus)

REPO = Path(__file__).resolve().parents[2]
PROM_DIR = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "alexnet-pp.json"


def project_scrape_config(sd_port: int) -> str:
    """deploy/prometheus/prometheus.yml as shipped, pointed at this job's driver and sped up for a test."""
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(PROM_DIR / "alerts.yml")]
    sd = cfg["scrape_configs"][0]["http_sd_configs"][0]
    assert sd["url"].startswith("http://127.0.0.1:")
    sd.update(url=f"http://127.0.0.1:{sd_port}/targets", refresh_interval="1s")
    return yaml.safe_dump(cfg)


@pytest.mark.e2e
@requires_prometheus
def test_dashboard_expressions_return_data_for_every_worker_of_a_real_job(tmp_path):
    run, sd_port = "mon-e2e", free_port()
    cmd = [sys.executable, "-m", "cluster.job", "--preset", "test", "--name", run, "--out-dir", str(tmp_path / "runs"),
           "--data.synthetic_dir", str(tmp_path / "data"), "--parallel.pp", "2", "--parallel.tp", "2",
           "--parallel.micro_batches", "2", "--train.batch_size", "16", "--train.max_steps", "40",
           "--train.eval_every", "0.1", "--train.threads", "1", "--checkpoint.every_steps", "4",
           "--metrics.enabled", "true", "--metrics.sd_port", str(sd_port),
           "--callbacks", "tests.cluster.job_callbacks:SlowSteps"]  # a live job to scrape
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "job.log"
    with open(log_path, "w") as log, PrometheusServer(project_scrape_config(sd_port), tmp_path / "prom") as prom:
        job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            prom.wait_for(f'count(up{{job="alexnet-pp", run="{run}"}} == 1) == 4', timeout=240)
            # a few scrapes of every worker after an evaluation and a checkpoint, for rate() windows
            prom.wait_for(f'count(alexnet_pp_eval_top1_accuracy_ratio{{run="{run}"}}) == 4', timeout=120)
            prom.wait_for(f'count(count_over_time(alexnet_pp_step{{run="{run}"}}[1m]) >= 6) == 4', timeout=120)
            prom.wait_for(f'sum(alexnet_pp_checkpoints_total{{run="{run}"}}) >= 4', timeout=120)
            assert job.poll() is None, "the job ended before Prometheus saw it running"
            results = evaluate_dashboard_expressions(prom.url, json.loads(DASHBOARD.read_text()), run,
                                                     rate_interval="30s")
            assert_dashboard_results(results, run)
            # the job's real throughput is what the dashboard's total shows
            ips = float(prom.query(f'sum(rate(alexnet_pp_images_total{{run="{run}"}}[20s]))')[0]["value"][1])
            assert ips > 0
            assert job.wait(timeout=300) == 0, log_path.read_text()[-3000:]
        finally:
            if job.poll() is None:
                os.killpg(job.pid, 9)
                job.wait(timeout=30)
    out = log_path.read_text()
    assert "Prometheus service discovery at" in out and "http_sd_configs" in out  # the driver prints the config
    summary = json.loads((tmp_path / "runs" / run / "summary.json").read_text())
    assert summary["ok"] and summary["steps"] == 40
    assert set(summary["bubble_per_stage"]) == {"0", "1"}
    assert "step time p50" in out  # the end-of-run summary
    # discovery is emptied when the job ends, so a finished run's endpoints don't linger
    assert json.loads((tmp_path / "runs" / run / "prometheus-targets.json").read_text()) == []
