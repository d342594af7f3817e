"""deploy/ manifests: what they run must be a valid alexnet-pp job for the versions this repo pins."""

from importlib.metadata import version

import re
import shlex
from pathlib import Path

import pytest
import yaml

from cluster.job import config_from_args
from cluster.topology import build_topology
from tests.deploy.shellwords import SH, run_recorded

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


# --- the image -----------------------------------------------------------------------------------------

# The CUDA version of the torch build each index serves (None: no CUDA), from the registries' metadata:
# PyPI's torch 2.13.0 manylinux wheel requires cuda-toolkit[...]==13.0.3 and nvidia-*-cu13 wheels; PyTorch's
# CPU index serves 2.13.0+cpu.
TORCH_CUDA = {
    ("https://pypi.org/simple", "torch==2.13.0"): "13.0",
    ("https://download.pytorch.org/whl/cpu", "torch==2.13.0"): None,
}


def dockerfile() -> str:
    return (DEPLOY / "docker" / "Dockerfile").read_text()


def arg_defaults(text: str) -> dict[str, str]:
    out = {}
    for name, value in re.findall(r"^ARG (\w+)=(.*)$", text, re.M):
        out[name] = value.strip().strip('"')
    return out


def documented_builds(text: str) -> list[dict[str, str]]:
    """The build args of each `docker build` line the Dockerfile's header documents, as bash passes them."""
    builds = []
    for line in re.findall(r"^#\s+(docker build .*)$", text, re.M):
        [call] = run_recorded(line, record=["docker"])
        args = arg_defaults(text)
        for i, a in enumerate(call.argv):
            if a == "--build-arg":
                k, v = call.argv[i + 1].split("=", 1)
                assert k in args, k  # only ARGs the Dockerfile declares
                args[k] = v
        builds.append(args)
    return builds


def base_cuda(image: str):
    m = re.search(r"-cu(\d+)(\d)$", image)
    if m:
        return f"{m.group(1)}.{m.group(2)}"
    assert image.endswith("-cpu"), image
    return None


def test_dockerfile_copies_every_package_and_installs_the_project():
    docker = dockerfile()
    copied = set(re.findall(r"^COPY (?:--\S+ )*(\S+)", docker, re.M))
    for pkg in ("alexnet_pp", "ops", "cluster", "pyproject.toml"):
        assert pkg in copied and (REPO / pkg).exists(), pkg
    assert "pip install --no-cache-dir -e ." in docker
    assert f"rayproject/ray:{RAY_VERSION}" in docker


def test_every_documented_image_pairs_torch_with_its_cuda():
    """GPU build: torch's CUDA major is the base image's (DeepSpeed's JIT ops refuse a mismatch); CPU
    build: a CPU torch on a CPU image, no CUDA wheels."""
    builds = documented_builds(dockerfile())
    assert len(builds) == 2
    kinds = set()
    for args in builds:
        assert args["BASE"].startswith(f"rayproject/ray:{RAY_VERSION}-py311-"), args
        cuda_torch = TORCH_CUDA[(args["TORCH_INDEX"], args["TORCH_SPEC"])]
        cuda_base = base_cuda(args["BASE"])
        if cuda_base is None:
            assert cuda_torch is None, args
        else:
            assert cuda_torch is not None and cuda_torch.split(".")[0] == cuda_base.split(".")[0], args
        kinds.add(cuda_base is None)
    assert kinds == {True, False}  # one GPU and one CPU recipe


@pytest.mark.parametrize("build", [0, 1])
def test_torch_is_installed_from_the_index_before_the_project(build):
    """The RUN line, as /bin/sh runs it with the build's args: torch from TORCH_INDEX first (the Ray image
    has none), then the project, which then pulls no other torch build."""
    text = dockerfile()
    args = documented_builds(text)[build]
    run = re.search(r"^RUN (pip install .*?)(?<!\\)$", text, re.M | re.S).group(1)
    calls = run_recorded(run, record=["pip", "python"], shell=SH, env=args)
    pips = [c.argv for c in calls if c.name == "pip"]
    assert pips[0] == ["install", "--no-cache-dir", "--index-url", args["TORCH_INDEX"], args["TORCH_SPEC"]]
    assert pips[1] == ["install", "--no-cache-dir", "-e", "."]


def test_dockerfile_leaves_the_accelerator_to_the_workers():
    # ENV DS_ACCELERATOR=cuda would override cluster/workers.py's choice (setdefault) in the CPU image
    assert not re.search(r"^ENV .*DS_ACCELERATOR", dockerfile(), re.M)
