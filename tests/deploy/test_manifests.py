"""deploy/ manifests: what they run must be a valid alexnet-pp job for the versions this repo pins, and
the command lines they hold must mean, to the shells that run them, what they say.

KubeRay's RayJob and the launcher's header are checked word by word as bash and /bin/sh split them
(tests/deploy/shellwords.py), never with shlex. deploy/ray/cluster.yaml has its own tests in
test_launcher.py, the KubeRay fields theirs in test_kuberay.py.
"""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from tests.deploy.jobconfig import entrypoint_config
from tests.deploy.shellwords import (BASH, SH, documented_command, job_supervisor_words,
                                     kuberay_submitted_entrypoint, run_recorded)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
REPO = DEPLOY.parent
# Not `import ray`: importing it fixes its auth mode for the process before test_job's fixtures set it.
RAY_VERSION = version("ray")
SD_PORT = 9400  # the one service-discovery port of every deploy file


def kuberay(name: str) -> dict:
    return yaml.safe_load((DEPLOY / "kuberay" / name).read_text())


def rayjob_driver_words() -> list[str]:
    """The RayJob's entrypoint as its driver process receives it: KubeRay's `bash -c` submit command,
    then the job supervisor's `/bin/sh -c`."""
    words = kuberay_submitted_entrypoint(kuberay("rayjob.yaml")["spec"]["entrypoint"])
    for shell in (SH, BASH):  # whichever shell /bin/sh is in the image
        assert job_supervisor_words(words, shell) == words, shell
    return words


def test_rayjob_entrypoint_survives_kuberays_shells_word_for_word():
    words = rayjob_driver_words()
    assert len(words) < 40, len(words)  # brace patterns would expand into ~1300 shard paths here
    assert not any(c in w for w in words for c in "{}*?[]$`\\'\""), words


def test_rayjob_runs_a_valid_paper_job():
    job = kuberay("rayjob.yaml")
    assert job["kind"] == "RayJob"
    cfg, layout = entrypoint_config(rayjob_driver_words())
    assert (cfg.model.width, cfg.model.image_size, cfg.model.num_classes) == (1.0, 224, 1000)
    assert cfg.checkpoint.dir.startswith("/shared") and cfg.out_dir.startswith("/shared")  # every node sees them
    # the shards: folders with their train-/val-manifest.json, on the volume every pod mounts read-only
    assert cfg.data.train == cfg.data.val == "/data/imagenet"
    assert cfg.metrics.host == "node" and cfg.metrics.sd_port == SD_PORT  # the pod's own address, port 9400
    gpus_per_node = int(job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
                        ["resources"]["limits"]["nvidia.com/gpu"])
    workers = sum(g["replicas"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert layout.world_size * cfg.parallel.gpus_per_worker <= gpus_per_node * workers


def test_raycluster_documented_submit_runs_a_valid_job_with_the_clusters_token():
    text = (DEPLOY / "kuberay" / "raycluster.yaml").read_text()
    script = "\n".join(documented_command(text, first) for first in
                       ("export RAY_AUTH_MODE", "export RAY_AUTH_TOKEN", "ray job submit"))
    fakes = {"kubectl": "printf c2VjcmV0LXRva2Vu"}  # base64 of the Secret's auth_token: "secret-token"
    [call] = [c for c in run_recorded(script, record=["ray"], fakes=fakes) if c.argv[:2] == ["job", "submit"]]
    assert call.env["RAY_AUTH_MODE"] == "token" and call.env["RAY_AUTH_TOKEN"] == "secret-token"
    entry = call.argv[call.argv.index("--") + 1:]
    assert job_supervisor_words(entry, SH) == job_supervisor_words(entry, BASH) == entry
    cfg, layout = entrypoint_config(entry)
    assert layout.world_size == 8
    assert cfg.metrics.host == "node" and cfg.metrics.sd_port == SD_PORT


def test_metrics_and_discovery_stay_on_loopback_unless_a_file_asks():
    """Exporters and discovery bind 127.0.0.1 by default; the cluster files ask for the node's own
    address (--metrics.host node, as test_launcher and the tests above check), never for every interface."""
    from alexnet_pp.config import RunConfig

    assert RunConfig().metrics.host == "127.0.0.1"
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            assert not re.search(r"metrics\.host[ =](0\.0\.0\.0|::|\"\")", path.read_text()), path


def test_kuberay_manifests_pin_the_installed_ray():
    for name in ("rayjob.yaml", "raycluster.yaml"):
        doc = kuberay(name)
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert spec["rayVersion"] == RAY_VERSION, name


def all_images() -> dict[str, str]:
    out = {"deploy/ray/cluster.yaml": yaml.safe_load((DEPLOY / "ray" / "cluster.yaml").read_text())["docker"]["image"]}
    for name in ("rayjob.yaml", "raycluster.yaml"):
        doc = kuberay(name)
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            for c in group["template"]["spec"]["containers"]:
                out[f"{name}:{c['name']}"] = c["image"]
    return out


def test_every_manifest_runs_the_same_pinned_image():
    [project_version] = re.findall(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    images = all_images()
    assert set(images.values()) == {f"alexnet-pp:{project_version}"}, images  # never :latest
    built = documented_command((DEPLOY / "docker" / "Dockerfile").read_text(), "docker build -t")
    [call] = run_recorded(built, record=["docker"])
    assert call.argv[call.argv.index("-t") + 1] == f"alexnet-pp:{project_version}"


def test_one_service_discovery_port_everywhere():
    ports = {"rayjob entrypoint": entrypoint_config(rayjob_driver_words())[0].metrics.sd_port}
    for name in ("rayjob.yaml", "raycluster.yaml"):
        doc = kuberay(name)
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        [head] = spec["headGroupSpec"]["template"]["spec"]["containers"]
        ports[f"{name} head port"] = {p.get("name"): p["containerPort"] for p in head["ports"]}["metrics-sd"]
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    url = prom["scrape_configs"][0]["http_sd_configs"][0]["url"]
    ports["prometheus.yml"] = int(re.fullmatch(r"http://127\.0\.0\.1:(\d+)/targets", url).group(1))
    [ports["Dockerfile EXPOSE"]] = [int(p) for p in re.findall(r"^EXPOSE (\d+)$",
                                                               (DEPLOY / "docker" / "Dockerfile").read_text(), re.M)]
    for path in DEPLOY.rglob("*"):  # every port a deploy file mentions next to discovery
        if path.is_file():
            for m in re.finditer(r"sd_port[ =](\d+)|:(\d+)/targets", path.read_text()):
                ports[f"{path.relative_to(REPO)}: {m.group(0)}"] = int(m.group(1) or m.group(2))
    assert set(ports.values()) == {SD_PORT}, ports


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
