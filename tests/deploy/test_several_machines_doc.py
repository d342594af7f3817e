"""The README's "Run on several machines" guide: every command it shows, run through bash as a reader would type it (cluster programs recorded,
not executed), starts Ray with token authentication, submits a valid job, and points Prometheus and
Grafana at the files in deploy/ that exist and agree with each other."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.jobconfig import entrypoint_config
from tests.deploy.ray_cli import ray_checks
from tests.deploy.shellwords import BASH, SH, job_supervisor_words, run_recorded

REPO = Path(__file__).resolve().parents[2]
HEADING = "## Run on several machines"
HEAD_IP = "10.0.3.7"


def guide() -> str:
    readme = (REPO / "README.md").read_text()
    assert HEADING in readme, f"README.md has no {HEADING!r} section"
    return HEADING + readme.split(HEADING, 1)[1].split("\n## ", 1)[0]


def commands() -> list[str]:
    """Every command of the guide's sh blocks (continuation lines joined), HEAD_IP filled in."""
    out = []
    for block in re.findall(r"```sh\n(.*?)```", guide(), re.S):
        for cmd in re.split(r"(?<!\\)\n", block.strip()):
            out.append(cmd.replace("HEAD_IP", HEAD_IP))
    return out


def recorded(first: str, record=("ray",)) -> list:
    calls = []
    for cmd in commands():
        if cmd.split("#")[0].strip() and re.search(rf"(^|\s){re.escape(first)}\s", cmd + " "):
            calls += run_recorded(cmd, record=list(record), cwd=REPO)
    return calls


def test_every_ray_command_runs_with_token_auth():
    calls = recorded("ray")
    kinds = {tuple(c.argv[:2]) if c.argv[0] == "job" else (c.argv[0],) for c in calls}
    assert {("get-auth-token",), ("start",), ("job", "submit")} <= kinds, kinds
    for c in calls:
        if c.argv[0] in ("start", "status", "job"):
            assert c.env["RAY_AUTH_MODE"] == "token", c.argv


def test_ray_start_lines_are_valid_for_the_installed_ray():
    starts = [c for c in recorded("ray") if c.argv[0] == "start"]
    parsed = ray_checks(start_argvs=[c.argv[1:] for c in starts])
    heads = [p for p in parsed if p.get("head")]
    workers = [p for p in parsed if not p.get("head")]
    assert {h["node_ip_address"] for h in heads} == {"127.0.0.1", HEAD_IP}
    assert [w["address"] for w in workers] == [f"{HEAD_IP}:6379"]
    local = next(c for c, p in zip(starts, parsed) if p.get("node_ip_address") == "127.0.0.1")
    # a loopback head registers the machine's interface address unless this is off (Ray 2.60)
    assert local.env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray start --head --node-ip-address 127.0.0.1" in guide()


def submitted_configs():
    out = []
    for call in recorded("ray"):
        if call.argv[:2] == ["job", "submit"]:
            entry = call.argv[call.argv.index("--") + 1:]
            for shell in (SH, BASH):
                assert job_supervisor_words(entry, shell) == entry
            address = call.argv[call.argv.index("--address") + 1]
            excludes = json.loads(call.argv[call.argv.index("--runtime-env-json") + 1])["excludes"]
            out.append((address, excludes, entrypoint_config(entry)))
    return out


def test_submitted_jobs_are_valid_and_use_the_deploy_discovery_port():
    jobs = submitted_configs()
    assert {a for a, _, _ in jobs} == {"http://127.0.0.1:8265", f"http://{HEAD_IP}:8265"}
    for address, excludes, (cfg, layout) in jobs:
        assert layout.world_size == 4 and cfg.metrics.sd_port == 9400
        # the venv, git, and what the driver's own upload leaves out as bulky: data, runs, docs/
        assert {".venv*", ".git", "/data", "/runs", "/docs"} <= set(excludes)
        if HEAD_IP in address:  # the cluster: shared paths, metrics on each node's address
            assert cfg.metrics.host == "node"
            assert cfg.out_dir.startswith("/shared/") and cfg.data.synthetic_dir.startswith("/shared/")
        else:
            assert cfg.metrics.host == "127.0.0.1"
            assert Path(cfg.out_dir).is_absolute() and Path(cfg.data.synthetic_dir).is_absolute()


def test_prometheus_commands_use_the_shipped_config_and_rules(tmp_path):
    prom_cmds = [c for c in commands() if re.match(r"(sed|prometheus) ", c)]
    assert len(prom_cmds) == 3
    shutil.copytree(REPO / "deploy", tmp_path / "deploy")  # the sed line writes beside the shipped file
    configs = []
    for cmd in prom_cmds:
        if cmd.startswith("sed "):
            subprocess.run(["bash", "-c", cmd], cwd=tmp_path, check=True, timeout=30)
            continue
        [call] = run_recorded(cmd, record=["prometheus"])
        [cfg] = [a.split("=", 1)[1] for a in call.argv if a.startswith("--config.file=")]
        assert (tmp_path / cfg).exists(), cfg
        assert "--web.listen-address=127.0.0.1:9090" in call.argv
        configs.append(tmp_path / cfg)
    urls = [re.search(r"url: (\S+)", p.read_text()).group(1) for p in configs]
    assert urls == ["http://127.0.0.1:9400/targets", f"http://{HEAD_IP}:9400/targets"]
    promtool = shutil.which("promtool")
    if promtool:  # both configs load, with their rules file beside them
        for p in configs:
            r = subprocess.run([promtool, "check", "config", str(p)], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stdout + r.stderr


def test_grafana_command_provisions_the_shipped_dashboard():
    [call] = [c for c in recorded("docker", record=("docker",)) if c.argv[:1] == ["run"]]
    mounts = dict(call.argv[i + 1].rsplit(":", 1) for i, a in enumerate(call.argv) if a == "-v")
    env = dict(call.argv[i + 1].split("=", 1) for i, a in enumerate(call.argv) if a == "-e")
    by_target = {t: Path(s).relative_to(REPO) for s, t in mounts.items()}
    assert by_target["/etc/grafana/provisioning"] == Path("deploy/grafana/provisioning")
    assert by_target["/var/lib/grafana/dashboards/alexnet-pp"] == Path("deploy/grafana/dashboards")
    provider = (REPO / "deploy/grafana/provisioning/dashboards/alexnet-pp.yml").read_text()
    assert "path: /var/lib/grafana/dashboards/alexnet-pp" in provider
    assert env["PROMETHEUS_URL"] == "http://127.0.0.1:9090" and env["GF_SERVER_HTTP_ADDR"] == "127.0.0.1"
    uid = json.loads((REPO / "deploy/grafana/dashboards/alexnet-pp.json").read_text())["uid"]
    assert f"http://127.0.0.1:3000/d/{uid}" in guide()


@pytest.mark.parametrize("phrase", ["deploy/ray/cluster.yaml", "deploy/kuberay/", "deploy/docker/Dockerfile",
                                    "deploy/prometheus/alerts.yml", "run:alexnet_pp_images:rate5m"])
def test_guide_names_only_files_and_series_that_exist(phrase):
    assert phrase in guide()
    if phrase.startswith("deploy/"):
        assert (REPO / phrase).exists()
    else:
        assert phrase in (REPO / "deploy/prometheus/alerts.yml").read_text()
