"""Test helper: a real Prometheus server, and the Grafana dashboard's queries evaluated against it.

    with PrometheusServer(config_yaml, tmp_path) as prom:      # 127.0.0.1:<free port>, stopped by PID
        prom.wait_for('count(up == 1) >= 4')
        results = evaluate_dashboard_expressions(prom.url, dashboard, run="r1")

Tests that use it should be marked `@requires_prometheus` (skips with the reason when the
`prometheus` binary is missing; CI installs it: `apt-get install -y --no-install-recommends prometheus`).
Import it as `from tests.prometheus_server import ...` (the suite runs as `python -m pytest` from
the repository root).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest

PROMETHEUS = shutil.which("prometheus")
requires_prometheus = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="the prometheus binary is not installed (apt-get install -y --no-install-recommends prometheus)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class PrometheusServer:
    """`prometheus` on 127.0.0.1 with `config` (YAML text) in `workdir`; `files` are written beside it
    (e.g. rule files the config names)."""

    def __init__(self, config: str, workdir: str | Path, files: Optional[dict[str, str]] = None,
                 binary: Optional[str] = None):
        self.config, self.workdir, self.files = config, Path(workdir), dict(files or {})
        self.binary = binary or PROMETHEUS
        self.proc: Optional[subprocess.Popen] = None
        self.port: Optional[int] = None
        self.log_path = self.workdir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> "PrometheusServer":
        if self.binary is None:
            pytest.skip("the prometheus binary is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for name, text in self.files.items():
            (self.workdir / name).write_text(text)
        cfg = self.workdir / "prometheus.yml"
        cfg.write_text(self.config)
        for attempt in range(3):  # the free port may be taken between our probe and Prometheus' bind
            self.port = free_port()
            self._log = open(self.log_path, "ab")
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={cfg}", f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h",
                 "--log.level=warn"],
                stdout=self._log, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True,
            )
            if self._wait_ready(timeout):
                return self
            self.stop()
        raise RuntimeError(f"prometheus did not become ready; log:\n{self.log()}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        return False

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # our own child, by its PID
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "PrometheusServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- the HTTP API ----------------------------------------------------------------------------

    def api(self, path: str, **params: str) -> Any:
        body = http_get_json(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}")
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]

    def targets(self) -> list[dict[str, Any]]:
        return self.api("targets", state="active")["activeTargets"]

    def wait_for(self, expr: str, timeout: float = 60.0, interval: float = 0.5) -> list[dict[str, Any]]:
        """Poll until `expr` returns a non-empty result."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = self.query(expr)
                if last:
                    return last
            except (urllib.error.URLError, OSError, RuntimeError) as e:
                last = e
            time.sleep(interval)
        raise AssertionError(f"{expr!r} still empty after {timeout}s (last: {last}); targets: "
                             f"{self.targets() if self.proc else '-'}\nlog:\n{self.log()}")


# --- Grafana dashboards ------------------------------------------------------------------------------


@dataclass
class ExprResult:
    panel: str
    ref_id: str
    expr: str  # as written in the dashboard
    query: str  # after substituting Grafana's variables
    result: list[dict[str, Any]] = field(default_factory=list)
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.result)


def dashboard_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every target of every panel, rows' nested panels included."""
    out = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((p.get("title", ""), t.get("refId", ""), t["expr"]))
            walk(p.get("panels", []))

    walk(dashboard.get("panels", []))
    return out


def substitute_grafana_variables(expr: str, variables: dict[str, str]) -> str:
    """Replace $name, ${name}, ${name:fmt} and [[name]] (longest names first)."""
    for name in sorted(variables, key=len, reverse=True):
        value = variables[name]
        expr = re.sub(r"\$\{" + re.escape(name) + r"(?::[^}]*)?\}", lambda _m: value, expr)
        expr = re.sub(r"\[\[" + re.escape(name) + r"\]\]", lambda _m: value, expr)
        expr = re.sub(r"\$" + re.escape(name) + r"(?![A-Za-z0-9_])", lambda _m: value, expr)
    return expr


def grafana_variables(run: str, rate_interval: str = "30s", interval: str = "5s", range_: str = "5m") -> dict[str, str]:
    seconds = {"s": 1, "m": 60, "h": 3600}

    def to_s(d: str) -> int:
        return int(d[:-1]) * seconds[d[-1]]

    return {
        "run": run,
        "__rate_interval": rate_interval,
        "__interval": interval,
        "__interval_ms": str(to_s(interval) * 1000),
        "__range": range_,
        "__range_s": str(to_s(range_)),
        "__range_ms": str(to_s(range_) * 1000),
    }


def evaluate_dashboard_expressions(prom_url: str, dashboard: dict[str, Any], run: str,
                                   **variables: str) -> list[ExprResult]:
    """Evaluate every panel expression (Grafana variables substituted) via /api/v1/query."""
    values = grafana_variables(run, **variables)
    out = []
    for title, ref, expr in dashboard_expressions(dashboard):
        q = substitute_grafana_variables(expr, values)
        res = ExprResult(title, ref, expr, q)
        try:
            body = http_get_json(f"{prom_url}/api/v1/query?{urllib.parse.urlencode({'query': q})}")
            if body.get("status") == "success":
                res.result = body["data"]["result"]
            else:
                res.error = f"{body.get('errorType')}: {body.get('error')}"
        except urllib.error.HTTPError as e:  # 400 for a bad query: the body says why
            try:
                body = json.loads(e.read())
                res.error = f"{body.get('errorType')}: {body.get('error')}"
            except Exception:
                res.error = str(e)
        except (urllib.error.URLError, OSError) as e:
            res.error = str(e)
        out.append(res)
    return out


def assert_dashboard_results(results: list, run: str) -> None:
    """Every dashboard expression returned finite data for this run; a per-worker panel shows all four
    workers of a (P, T, D) = (2, 2, 1) job once each; lead-only metrics come from stage 0 only; CUDA-only
    panels are empty on machines without CUDA."""
    import torch

    from cluster.metrics import cuda_only_names, lead_only_names

    assert results
    all_pairs = {("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")}
    for r in results:
        assert r.error is None, (r.panel, r.query, r.error)
        names = metric_names(r.expr)
        if names & cuda_only_names() and not torch.cuda.is_available():
            assert not r.result, r  # no CUDA on this machine: no series
            continue
        assert r.result, (r.panel, r.query)
        lead_only = bool(names & lead_only_names())
        for series in r.result:
            labels, (_, v) = series["metric"], series["value"]
            assert math.isfinite(float(v)), (r.panel, r.query, series)
            assert labels.get("run", run) == run
            if "stage" in labels and lead_only:
                assert labels["stage"] == "0", (r.panel, series)
        if "tower" in r.result[0]["metric"]:  # a per-worker panel: all four workers, once each
            pairs = [(s["metric"]["stage"], s["metric"]["tower"]) for s in r.result]
            assert sorted(pairs) == sorted(all_pairs), (r.panel, pairs)
        elif "stage" in r.result[0]["metric"] and not lead_only:
            assert {s["metric"]["stage"] for s in r.result} == {"0", "1"}, (r.panel, r.result)


# --- PromQL: which metric names does an expression select? ---------------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
             "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Identifiers used as metric names: not functions (followed by '('), not keywords, not labels."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges, subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)  # label lists
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        tail = e[m.end():].lstrip()
        if m.group().lower() in _KEYWORDS or tail.startswith("("):
            continue
        if m.start() > 0 and (e[m.start() - 1].isdigit() or e[m.start() - 1] == "."):
            continue  # the exponent / unit of a number such as 1e6
        names.add(m.group())
    return names
