"""deploy/ray/cluster.yaml as the Ray cluster launcher (Ray 2.60) reads and runs it.

The file is validated against the launcher's own schema and checks; its commands are run through bash
the way the launcher runs them on a node, with the node's programs (ray, sudo, curl, ...) recorded
instead of executed (tests/deploy/shellwords.py).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.deploy.jobconfig import entrypoint_config
from tests.deploy.ray_cli import ray_checks
from tests.deploy.shellwords import (BASH, SH, documented_command, job_supervisor_words, run_recorded,
                                     shell_words)

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "deploy" / "ray" / "cluster.yaml"
HEAD_IP = "10.0.3.7"
VPC_CIDR = "10.0.0.0/16"
# How the launcher runs a command on a node (ray/autoscaler/_private/command_runner.py, _with_interactive:
# `bash --login -c -i 'source ~/.bashrc; export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore && (CMD)'`),
# with `export RAY_HEAD_IP=...;` in front of worker nodes' commands (util.with_head_node_ip).
LAUNCHER_WRAP = "export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore && ({})"
# The node's programs, answering as on an EC2 instance of the cluster (IMDSv2) without NFS packages yet.
NODE_FAKES = {
    "curl": 'case "$*" in *api/token*) printf t0k;; */meta-data/mac*) printf 0a:1b:2c:3d:4e:5f;; '
            f'*vpc-ipv4-cidr-block*) printf {VPC_CIDR};; *) return 22;; esac',
    "dpkg": "return 1",
    "mountpoint": "return 1",
}


def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def on_node(commands: list[str], worker: bool) -> list:
    prefix = f"export RAY_HEAD_IP={HEAD_IP}; " if worker else ""
    calls = []
    for cmd in commands:
        calls += run_recorded(LAUNCHER_WRAP.format(prefix + cmd), record=["ray", "sudo"], fakes=NODE_FAKES)
    return calls


def test_cluster_yaml_passes_the_launchers_schema_and_checks():
    spec = importlib.util.find_spec("ray")  # the installed package's files; ray itself is not imported here
    schema = json.loads((Path(spec.submodule_search_locations[0]) / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cluster(), schema)
    ray_checks(cluster_yaml=CLUSTER_YAML)  # prepare_config + validate_config, as `ray up` does first


def test_every_ray_start_runs_with_token_auth():
    """`ray start` without RAY_AUTH_MODE=token and without a token on the node starts a cluster anyone on the
    network can submit jobs to (Ray 2.60: scripts.py start -> maybe_enable_token_auth_if_token_available).
    Every ray start here runs in token mode, and the token reaches every node and container."""
    cfg = cluster()
    head = [c for c in on_node(cfg["head_start_ray_commands"], worker=False) if c.argv[:1] == ["start"]]
    workers = [c for c in on_node(cfg["worker_start_ray_commands"], worker=True) if c.argv[:1] == ["start"]]
    assert len(head) == 1 and len(workers) == 1
    for call in head + workers:
        assert call.env["RAY_AUTH_MODE"] == "token", call  # in the command itself, not only the container
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # Ray's default token path
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]  # ray exec / attach in the container
    head_opts, worker_opts = ray_checks(start_argvs=[head[0].argv[1:], workers[0].argv[1:]])
    assert head_opts["head"] is True and head_opts["port"] == 6379
    assert worker_opts["address"] == f"{HEAD_IP}:6379"
    assert head_opts["metrics_export_port"] == worker_opts["metrics_export_port"] == 8080


def test_every_node_mounts_the_heads_shared_storage():
    """Checkpoints and the run directory must be one file system for all ranks: the head exports /shared
    to the VPC, GPU nodes mount it before their container starts, and every container sees it."""
    cfg = cluster()
    head = on_node(cfg["initialization_commands"], worker=False)
    exports = [c for c in head if c.argv[:1] == ["tee"]]
    assert [c.argv for c in exports] == [["tee", "/etc/exports.d/alexnet-pp.exports"]]
    assert exports[0].stdin.strip() == f"/shared {VPC_CIDR}(rw,sync,no_subtree_check)"
    assert ["exportfs", "-ra"] in [c.argv for c in head]
    assert ["chown", "1000:100", "/shared"] in [c.argv for c in head]  # the image's ray user (ray:users)
    gpu = cfg["available_node_types"]["gpu_workers"]
    worker = on_node(gpu["initialization_commands"], worker=True)
    mounts = [c.argv for c in worker if c.argv[:1] == ["mount"]]
    assert mounts == [["mount", "-t", "nfs4", "-o", "hard,noatime", f"{HEAD_IP}:/shared", "/shared"]]
    assert "-v /shared:/shared" in cfg["docker"]["run_options"]


def test_docker_and_machine_images_are_pinned_and_shm_is_sized_by_ray():
    cfg = cluster()
    docker = cfg["docker"]
    assert not any("--shm-size" in opt for opt in docker["run_options"])  # would switch Ray's sizing off
    assert not docker.get("disable_shm_size_detection", False)
    [project_version] = re.findall(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert docker["image"] == f"alexnet-pp:{project_version}"  # the tag the header builds, never :latest
    images = {t: n["node_config"].get("ImageId") for t, n in cfg["available_node_types"].items()}
    for node_type, image in images.items():
        # without one the launcher falls back to its default Deep Learning AMI, whose driver predates CUDA 13
        assert image and re.fullmatch(r"ami-[0-9a-f]{17}", image), (node_type, image)
    assert len(set(images.values())) == 1


def test_documented_submit_command_runs_a_valid_job():
    text = CLUSTER_YAML.read_text()
    submit = documented_command(text, "RAY_AUTH_MODE=token ray job submit")
    [call] = [c for c in run_recorded(submit, record=["ray"]) if c.argv[:2] == ["job", "submit"]]
    assert call.env["RAY_AUTH_MODE"] == "token"
    assert call.argv[call.argv.index("--address") + 1] == "http://127.0.0.1:8265"  # `ray dashboard` forwards it
    entry = call.argv[call.argv.index("--") + 1:]
    for shell in (SH, BASH):  # the job supervisor's /bin/sh, whichever shell that is
        assert job_supervisor_words(entry, shell) == entry
    cfg, layout = entrypoint_config(entry)
    assert layout.world_size == 8
    assert cfg.metrics.host == "node" and cfg.metrics.sd_port == 9400
    for path in (cfg.checkpoint.dir, cfg.out_dir, cfg.data.train, cfg.data.val):
        assert path.startswith("/shared/"), path  # on the file system every node mounts


@pytest.mark.parametrize("first", ["ray get-auth-token", "ray up", "ray rsync-up", "ray dashboard"])
def test_documented_launcher_commands_are_single_commands(first):
    """The header's other command lines split into the words they show (no shell surprises)."""
    words = shell_words(documented_command(CLUSTER_YAML.read_text(), first))
    assert words[:len(first.split())] == first.split()
    if first != "ray get-auth-token":
        assert words[2] == "deploy/ray/cluster.yaml"
