"""deploy/ manifests: what they run must be a valid alexnet-pp job for the versions this repo pins."""

from importlib.metadata import version

import re
import shlex
from pathlib import Path

import yaml

from cluster.job import config_from_args
from cluster.topology import build_topology

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
REPO = DEPLOY.parent
# Not `import ray`: importing it fixes its auth mode for the process before test_job's fixtures set it.
RAY_VERSION = version("ray")


def entrypoint_config(entrypoint: str):
    argv = shlex.split(entrypoint)
    assert argv[:3] == ["python", "-m", "cluster.job"], argv[:3]
    cfg, _ = config_from_args(argv[3:])
    return cfg


def test_rayjob_runs_a_valid_paper_job():
    job = yaml.safe_load((DEPLOY / "kuberay" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob"
    cfg = entrypoint_config(job["spec"]["entrypoint"])
    topo = build_topology(cfg)
    assert (cfg.model.width, cfg.model.image_size, cfg.model.num_classes) == (1.0, 224, 1000)
    assert cfg.checkpoint.dir.startswith("/shared") and cfg.out_dir.startswith("/shared")  # every node sees them
    gpus_per_node = int(job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
                        ["resources"]["limits"]["nvidia.com/gpu"])
    workers = sum(g["replicas"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert topo.world_size * cfg.parallel.gpus_per_worker <= gpus_per_node * workers


def test_kuberay_manifests_pin_the_installed_ray():
    for name in ("rayjob.yaml", "raycluster.yaml"):
        doc = yaml.safe_load((DEPLOY / "kuberay" / name).read_text())
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert spec["rayVersion"] == RAY_VERSION, name


def test_dockerfile_copies_every_package_and_installs_the_project():
    docker = (DEPLOY / "docker" / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (?:--\S+ )*(\S+)", docker, re.M))
    for pkg in ("alexnet_pp", "ops", "cluster", "pyproject.toml"):
        assert pkg in copied and (REPO / pkg).exists(), pkg
    assert "pip install --no-cache-dir -e ." in docker
    assert f"rayproject/ray:{RAY_VERSION}" in docker
