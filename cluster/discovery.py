"""How Prometheus finds the workers' exporters: files under run_dir, served by the driver.

Worker side: `register_endpoint(run_dir, job, attempt, coord, run, host, port)` writes
`run_dir/metrics/rank{r}.json` atomically (one file per rank, so a restarted rank overwrites its
predecessor); `unregister_endpoint(path, record)` deletes it on a clean exit, unless a newer worker
already took it over. `run_dir` is already the job's shared folder (checkpoints, history), so on a
multi-node cluster it must be on shared storage for this, too.

Driver side: `DiscoveryServer(run_dir, run, host, port, job)` serves the live targets in Prometheus'
`http_sd_configs` format — `[{"targets": ["host:port"], "labels": {...}}]` — on GET (any path,
`url` points at /targets), and keeps `run_dir/prometheus-targets.json` (file_sd format) up to date
for users who prefer `file_sd_configs`. Only the newest attempt of the job is served, so targets of
a crashed worker group disappear as soon as the new group registers; `close()` empties the file.
`scrape_config(...)` renders the scrape-config snippet the driver prints at start.

The target labels (run, stage, tower, replica, node, rank) repeat the exporters' own labels; the
scrape job needs `honor_labels: true`, otherwise Prometheus renames the exporters' copies to
`exported_*`. A worker killed outright leaves its file behind: its rank's next attempt replaces
it, and a later job is told apart by its job id.

Also here, shared by exporters and the driver: `resolve_host` ("node" → this node's IP, as Ray sees
it) and `bind_with_fallback` (a configured port that is taken → a free one, logged, never fatal).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Optional

from alexnet_pp.fileio import write_atomic

log = logging.getLogger(__name__)

JOB_NAME = "alexnet-pp"


def endpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "metrics"


def file_sd_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "prometheus-targets.json"


# --- addresses ------------------------------------------------------------------------------------------


def node_ip() -> str:
    """This node's IP: Ray's view when inside Ray, else the address of the default route."""
    ray = sys.modules.get("ray")
    if ray is not None:
        try:
            if ray.is_initialized():
                return ray.util.get_node_ip_address()
        except Exception:  # not a Ray process after all
            pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.254.254.254", 1))  # UDP connect sends nothing; it only picks a route
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def resolve_host(host: str) -> tuple[str, str]:
    """(address to bind, address to advertise). "node": the node's IP; "0.0.0.0"/"": bind all,
    advertise the node's IP; anything else is used literally."""
    if host == "node":
        ip = node_ip()
        return ip, ip
    if host in ("", "0.0.0.0", "::"):
        return host or "0.0.0.0", node_ip()
    return host, host


def bind_with_fallback(bind: str, port: int, serve: Callable[[str, int], Any]) -> Any:
    """`serve(bind, port)`; if the port is taken, once more on a free port (logged, never fatal)."""
    try:
        return serve(bind, port)
    except OSError as e:
        if port == 0:
            raise
        log.warning("port %s:%d unavailable (%s); using a free port instead", bind, port, e)
        return serve(bind, 0)


# --- worker side ---------------------------------------------------------------------------------


def register_endpoint(run_dir: str | Path, job: str, attempt: int, coord: Any, run: str, host: str, port: int,
                      node: Optional[str] = None) -> tuple[Path, dict[str, Any]]:
    """Announce one rank's exporter; returns (path, record) for unregister_endpoint."""
    labels = {"run": run, "stage": str(coord.stage), "tower": str(coord.tower), "replica": str(coord.replica),
              "rank": str(coord.rank)}
    if node:
        labels["node"] = node
    record = {"job": job, "attempt": int(attempt), "rank": int(coord.rank), "targets": [f"{host}:{port}"],
              "labels": labels, "pid": os.getpid(), "time": time.time()}
    path = endpoints_dir(run_dir) / f"rank{coord.rank}.json"
    write_atomic(path, json.dumps(record))
    return path, record


def unregister_endpoint(path: str | Path, record: dict[str, Any]) -> None:
    """Remove our registration, but not a newer worker's that replaced it."""
    path = Path(path)
    try:
        current = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    if (current.get("pid"), current.get("targets"), current.get("attempt")) == (
            record["pid"], record["targets"], record["attempt"]):
        path.unlink(missing_ok=True)


def read_endpoints(run_dir: str | Path, run: Optional[str] = None, job: Optional[str] = None) -> list[dict[str, Any]]:
    """The registrations of the newest attempt (of `job`, if given; of `run`, if given), by rank."""
    records = []
    d = endpoints_dir(run_dir)
    for p in sorted(d.glob("rank*.json")) if d.is_dir() else []:
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):  # being replaced right now: next refresh sees it
            continue
        if job is not None and rec.get("job") != job:
            continue
        if run is not None and rec.get("labels", {}).get("run") != run:
            continue
        records.append(rec)
    if not records:
        return []
    if job is None:  # files of several jobs: the most recently started one
        newest = max(records, key=lambda r: r.get("time", 0.0))["job"]
        records = [r for r in records if r.get("job") == newest]
    latest = max(r.get("attempt", 0) for r in records)
    return sorted((r for r in records if r.get("attempt", 0) == latest), key=lambda r: r["rank"])


def sd_targets(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"targets": list(r["targets"]), "labels": dict(r["labels"])} for r in records]


# --- driver side -------------------------------------------------------------------------------------


class DiscoveryServer:
    """Prometheus HTTP service discovery for one run, plus the file_sd file beside it."""

    def __init__(self, run_dir: str | Path, run: str, host: str = "127.0.0.1", port: int = 0,
                 job: Optional[str] = None, refresh_s: float = 2.0):
        self.run_dir, self.run, self.job = Path(run_dir), run, job
        self.host, self.port, self.refresh_s = host, port, refresh_s
        self.file_sd = file_sd_path(self.run_dir)
        self._server: Optional[ThreadingHTTPServer] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._last_written: Optional[str] = None
        self.address: Optional[tuple[str, int]] = None

    def targets(self) -> list[dict[str, Any]]:
        return sd_targets(read_endpoints(self.run_dir, self.run, self.job))

    def start(self) -> "DiscoveryServer":
        if self._server is not None:
            return self
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # any path: Prometheus only needs one URL
                body = json.dumps(outer.targets()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # Prometheus polls; keep the driver's log clean
                pass

        bind, advertise = resolve_host(self.host)

        def serve(b: str, p: int) -> ThreadingHTTPServer:
            return ThreadingHTTPServer((b, p), Handler)

        self._server = bind_with_fallback(bind, self.port, serve)
        self._server.daemon_threads = True
        self.address = (advertise, self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, name="metrics-sd", daemon=True).start()
        self.write_file_sd()
        self._thread = threading.Thread(target=self._refresh, name="metrics-file-sd", daemon=True)
        self._thread.start()
        log.info("Prometheus service discovery for run %s at %s (file_sd: %s)", self.run, self.url, self.file_sd)
        return self

    @property
    def url(self) -> Optional[str]:
        return f"http://{self.address[0]}:{self.address[1]}/targets" if self.address else None

    def write_file_sd(self, targets: Optional[list[dict[str, Any]]] = None) -> None:
        text = json.dumps(self.targets() if targets is None else targets, indent=1)
        if text != self._last_written:
            try:
                write_atomic(self.file_sd, text)
                self._last_written = text
            except OSError as e:
                log.warning("could not write %s: %s", self.file_sd, e)

    def _refresh(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.write_file_sd()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            self.write_file_sd([])  # the job is over: nothing left to scrape

    def __enter__(self) -> "DiscoveryServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def scrape_config(self, scrape_interval: str = "5s") -> str:
        return scrape_config(self.url, self.file_sd, scrape_interval)


def scrape_config(sd_url: Optional[str], file_sd: Optional[str | Path] = None, scrape_interval: str = "5s",
                  job_name: str = JOB_NAME) -> str:
    """The `scrape_configs` entry a user adds to prometheus.yml (see deploy/prometheus/prometheus.yml)."""
    lines = [
        "scrape_configs:",
        f"  - job_name: {job_name}",
        f"    scrape_interval: {scrape_interval}",
        "    honor_labels: true  # the exporters' run/stage/tower/replica labels, not exported_*",
    ]
    if sd_url:
        lines += ["    http_sd_configs:", f"      - url: {sd_url}", "        refresh_interval: 15s"]
    if file_sd:
        prefix = "    # or, instead of http_sd_configs:\n    # " if sd_url else "    "
        body = ["file_sd_configs:", f"  - files: ['{Path(file_sd).resolve()}']", "    refresh_interval: 15s"]
        lines.append(prefix + ("\n    # " if sd_url else "\n    ").join(body))
    return "\n".join(lines) + "\n"
