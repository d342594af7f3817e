"""deploy/kuberay/*.yaml against the KubeRay v1 API, without a cluster.

The facts below come from ray-project/kuberay v1.7.0: the CRDs
ray-operator/config/crd/bases/ray.io_rayclusters.yaml and ray.io_rayjobs.yaml (field names, types,
enums, required fields), and the operator's code where a behaviour matters (cited at each fact). They are
the facts these manifests rely on, not a copy of the CRDs: a manifest that uses a field not listed here
fails until someone looks the field up in the CRD and adds it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.deploy.ray_cli import ray_checks

KUBERAY = Path(__file__).resolve().parents[2] / "deploy" / "kuberay"
MANIFESTS = ("raycluster.yaml", "rayjob.yaml")

# Types as the CRDs' openAPIV3Schema gives them; "int-or-string" is x-kubernetes-int-or-string (quantities);
# "object" is a field the CRD does not describe further (metadata: the standard ObjectMeta). `.*` is any key
# of a map (additionalProperties), `[]` any item of a list.
_TEMPLATE = {  # a group's pod template (the CRDs embed core/v1 PodTemplateSpec)
    "template.spec.containers[].name": {"type": "string"},
    "template.spec.containers[].image": {"type": "string"},
    "template.spec.containers[].resources.limits.*": {"type": "int-or-string"},
    "template.spec.containers[].ports[].containerPort": {"type": "integer"},
    "template.spec.containers[].ports[].name": {"type": "string"},
    "template.spec.containers[].volumeMounts[].name": {"type": "string"},
    "template.spec.containers[].volumeMounts[].mountPath": {"type": "string"},
    "template.spec.containers[].volumeMounts[].readOnly": {"type": "boolean"},
    "template.spec.volumes[].name": {"type": "string"},
    "template.spec.volumes[].persistentVolumeClaim.claimName": {"type": "string"},
    "template.spec.volumes[].emptyDir.medium": {"type": "string"},
}
_TEMPLATE_REQUIRED = {
    "template.spec": ["containers"],
    "template.spec.containers[]": ["name"],
    "template.spec.containers[].ports[]": ["containerPort"],
    "template.spec.containers[].volumeMounts[]": ["mountPath", "name"],
    "template.spec.volumes[]": ["name"],
    "template.spec.volumes[].persistentVolumeClaim": ["claimName"],
}
# RayCluster .spec, which is also RayJob .spec.rayClusterSpec
CLUSTER_SPEC = {
    "rayVersion": {"type": "string"},
    "authOptions.mode": {"type": "string", "enum": ["disabled", "token"]},
    "headGroupSpec.rayStartParams.*": {"type": "string"},
    **{f"headGroupSpec.{k}": v for k, v in _TEMPLATE.items()},
    "workerGroupSpecs[].groupName": {"type": "string"},
    "workerGroupSpecs[].replicas": {"type": "integer"},
    "workerGroupSpecs[].minReplicas": {"type": "integer"},
    "workerGroupSpecs[].maxReplicas": {"type": "integer"},
    "workerGroupSpecs[].rayStartParams.*": {"type": "string"},
    **{f"workerGroupSpecs[].{k}": v for k, v in _TEMPLATE.items()},
}
CLUSTER_SPEC_REQUIRED = {
    "": ["headGroupSpec"],
    "headGroupSpec": ["template"],
    "workerGroupSpecs[]": ["groupName", "maxReplicas", "minReplicas", "template"],
    **{f"headGroupSpec.{k}": v for k, v in _TEMPLATE_REQUIRED.items()},
    **{f"workerGroupSpecs[].{k}": v for k, v in _TEMPLATE_REQUIRED.items()},
}
TOP = {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}}
FIELDS = {
    "RayCluster": {**TOP, **{f"spec.{k}": v for k, v in CLUSTER_SPEC.items()}},
    "RayJob": {
        **TOP,
        "spec.entrypoint": {"type": "string"},
        "spec.shutdownAfterJobFinishes": {"type": "boolean"},
        "spec.ttlSecondsAfterFinished": {"type": "integer"},
        "spec.backoffLimit": {"type": "integer"},
        **{f"spec.rayClusterSpec.{k}": v for k, v in CLUSTER_SPEC.items()},
    },
}
REQUIRED = {
    "RayCluster": {("spec." + k).rstrip("."): v for k, v in CLUSTER_SPEC_REQUIRED.items()},
    "RayJob": {("spec.rayClusterSpec." + k).rstrip("."): v for k, v in CLUSTER_SPEC_REQUIRED.items()},
}
# Operator behaviour (v1.7.0):
# - authOptions.mode "token" needs rayVersion >= 2.52.0 (utils/validation.go); the operator then creates a
#   token Secret named after the RayCluster (key auth_token) and sets RAY_AUTH_MODE / RAY_AUTH_TOKEN on every
#   Ray container and on the RayJob submitter (common/pod.go SetContainerTokenAuthEnvVars).
MIN_RAY_FOR_TOKEN = (2, 52, 0)
# - The head Service is named "<RayCluster name>-head-svc" unless headGroupSpec.headService names it; a RayJob
#   keeps its own head Service named "<RayJob name>-head-svc" for whichever cluster runs it
#   (utils.GenerateHeadServiceName, common/job.go BuildHeadServiceForRayJob). Its ports are the head
#   container's ports (common/service.go getPortsFromCluster).
HEAD_SERVICE_SUFFIX = "-head-svc"
# - rayStartParams {k: v} become `ray start --k=v` (plus --head on the head, --address on workers).


def load(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def walk(doc, path=()):
    """(path, value) of every leaf and (path, keys) of every mapping; a path is a tuple of keys, a list's
    items adding "[]" to the last (map keys such as nvidia.com/gpu hold dots of their own)."""
    if isinstance(doc, dict):
        yield path, ("mapping", set(doc))
        for k, v in doc.items():
            yield from walk(v, (*path, k))
    elif isinstance(doc, list):
        for item in doc:
            yield from walk(item, (*path[:-1], path[-1] + "[]"))
    else:
        yield path, ("leaf", doc)


def field_fact(kind: str, path: tuple):
    facts = FIELDS[kind]
    return facts.get(".".join(path)) or facts.get(".".join((*path[:-1], "*")))


def known_object(kind: str, path: tuple) -> bool:
    """A mapping on the way to some known field (its path a prefix of one)."""
    prefixes = {f.rsplit(".", n)[0] for f in FIELDS[kind] for n in range(1, f.count(".") + 1)}
    return ".".join(path) in prefixes or ".".join((*path[:-1], "*")) in prefixes


def type_ok(fact: dict, value) -> bool:
    t = fact["type"]
    ok = {"string": isinstance(value, str), "integer": isinstance(value, int) and not isinstance(value, bool),
          "boolean": isinstance(value, bool), "int-or-string": isinstance(value, (int, str)) and not isinstance(value, bool),
          "object": isinstance(value, dict)}[t]
    return ok and ("enum" not in fact or value in fact["enum"])


def crd_problems(doc: dict) -> list[str]:
    """What the facts above say is wrong with a RayCluster / RayJob document."""
    kind = doc.get("kind")
    if doc.get("apiVersion") != "ray.io/v1" or kind not in FIELDS:
        return [f"not a ray.io/v1 RayCluster or RayJob: {doc.get('apiVersion')} {kind}"]
    problems = []
    for path, (what, value) in walk(doc):
        where = ".".join(path)
        if path[:1] == ("metadata",):
            continue  # ObjectMeta: not described by the CRD
        if what == "mapping":
            if path and not known_object(kind, path):
                problems.append(f"{where} is not a field these facts know; look it up in the {kind} CRD")
            problems += [f"{where} needs {key!r} (required)" for key in REQUIRED[kind].get(where, [])
                         if key not in value]
            continue
        fact = field_fact(kind, path)
        if fact is None:
            problems.append(f"{where} is not a field these facts know; look it up in the {kind} CRD")
        elif not type_ok(fact, value):
            problems.append(f"{where} = {value!r} is not {fact}")
    return problems


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_field_exists_in_the_crd_with_its_type(name):
    assert crd_problems(load(name)) == []


def test_the_field_check_finds_what_the_api_server_would_reject():
    job = load("rayjob.yaml")
    spec = job["spec"]["rayClusterSpec"]
    spec["workerGroupSpecs"][0]["rayStartParams"]["metrics-export-port"] = 8080  # must be a string
    spec["headGroupSpec"]["rayStartParam"] = {}  # misspelt field
    del spec["workerGroupSpecs"][0]["minReplicas"]  # required
    spec["authOptions"]["mode"] = "tokens"  # not in the enum
    job["spec"]["ttlSecondsAfterFinished"] = "600"  # an integer
    assert sorted(crd_problems(job)) == sorted([
        "spec.rayClusterSpec.workerGroupSpecs[].rayStartParams.metrics-export-port = 8080 is not {'type': 'string'}",
        "spec.rayClusterSpec.headGroupSpec.rayStartParam is not a field these facts know; look it up in the RayJob CRD",
        "spec.rayClusterSpec.workerGroupSpecs[] needs 'minReplicas' (required)",
        "spec.rayClusterSpec.authOptions.mode = 'tokens' is not {'type': 'string', 'enum': ['disabled', 'token']}",
        "spec.ttlSecondsAfterFinished = '600' is not {'type': 'integer'}",
    ])


@pytest.mark.parametrize("name", MANIFESTS)
def test_token_authentication_is_on(name):
    doc = load(name)
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    assert spec["authOptions"]["mode"] == "token"
    assert tuple(int(x) for x in spec["rayVersion"].split(".")) >= MIN_RAY_FOR_TOKEN
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for c in group["template"]["spec"]["containers"]:
            # the operator's RAY_AUTH_* variables must not be overridden or turned off by hand
            assert not any(e["name"].startswith("RAY_AUTH") for e in c.get("env", [])), c["name"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_ray_start_params_are_options_of_ray_start(name):
    doc = load(name)
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    head = ["--head", *(f"--{k}={v}" for k, v in spec["headGroupSpec"]["rayStartParams"].items())]
    workers = [["--address=head-svc:6379", *(f"--{k}={v}" for k, v in g["rayStartParams"].items())]
               for g in spec["workerGroupSpecs"]]
    parsed = ray_checks(start_argvs=[head, *workers])
    assert parsed[0]["head"] is True


@pytest.mark.parametrize("name", MANIFESTS)
def test_prometheus_reaches_discovery_through_a_stable_head_service(name):
    """The head container declares the discovery port (so the head Service has it), and the service name
    the file tells Prometheus to use is the one KubeRay gives the head Service."""
    doc = load(name)
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    assert "headService" not in spec["headGroupSpec"]  # the default name below applies
    [head] = spec["headGroupSpec"]["template"]["spec"]["containers"]
    ports = {p.get("name"): p["containerPort"] for p in head["ports"]}
    assert ports["metrics-sd"] == 9400
    assert ports.get("dashboard", 8265) == 8265 and ports.get("gcs-server", 6379) == 6379  # KubeRay's port names
    service = doc["metadata"]["name"] + HEAD_SERVICE_SUFFIX
    url = f"http://{service}.<namespace>.svc:9400/targets"
    assert url in (KUBERAY / name).read_text()
    assert url in (KUBERAY.parent / "prometheus" / "prometheus.yml").read_text()
