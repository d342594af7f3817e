"""Several Ray nodes on one machine, every one on loopback: a job spread over two worker nodes that
loses one of them, a killed driver, and elastic data parallelism.

One cluster serves the whole module (tests/helpers/loopback_cluster.py): a head on 127.0.0.1 with
no CPUs and the job API, and worker nodes of 2 CPUs each on 127.0.0.2, 127.0.0.3, … A (2, 2, 1) job
of four 1-CPU workers fits no single node, so it must spread over two; PACK keeps each stage's two
towers (neighbouring ranks) on one node. Tests that kill a node leave the cluster with the nodes it
has left; each test first tops the cluster up to two worker nodes with fresh addresses.

The jobs run as users run them — `python -m cluster.job --address GCS` or `ray job submit` — with
token authentication and a token file of the module's own. Every process of the cluster and of each
job lives in a session the test started and is stopped by PID.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from alexnet_pp.config import load_config, parse_override_args
from cluster.inference import load_checkpoint_state
from loopback_cluster import LoopbackCluster, Node
from rayproc import BIN, REPO, Job, free_ports, ray_env

STEPS, EVERY = 8, 2
TINY = ["--train.max_steps", str(STEPS), "--train.batch_size", "16", "--parallel.micro_batches", "2",
        "--model.dropout", "0", "--train.threads", "1", "--parallel.partition", "uniform",
        "--checkpoint.every_steps", str(EVERY)]
PP2_TP2 = ["--parallel.pp", "2", "--parallel.tp", "2"]
SLOW = ["--callbacks", "tests.cluster.job_callbacks:SlowSteps"]  # 0.4 s a step: a window to act in

pytestmark = pytest.mark.e2e


def job_args(out: Path, data: Path, *extra: str) -> list[str]:
    return ["--preset", "test", *TINY, "--data.synthetic_dir", str(data), "--out_dir", str(out), *extra]


def assert_close(a: list[float], b: list[float], rtol: float = 1e-4, atol: float = 1e-6) -> None:
    assert len(a) == len(b), (a, b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= atol + rtol * abs(y), f"loss {i}: {x} vs {y}\n{a}\n{b}"


def wait_for(condition, timeout: float, what: str, job: Job | None = None, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if job is not None and job.proc.poll() is not None:
            raise AssertionError(f"the job exited ({job.proc.returncode}) before {what}:\n{job.output()}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}" + (f":\n{job.output()}" if job else ""))


def complete_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name[4:]) for p in (run_dir / "checkpoints").glob("step*/COMPLETE.json"))


def worker_records(run_dir: Path) -> dict[int, dict]:
    from cluster.workers import read_worker_files

    return read_worker_files(run_dir)


def steps_logged(run_dir: Path) -> list[int]:
    from cluster.workers import history_path, read_jsonl

    return [r["step"] for r in read_jsonl(history_path(run_dir)) if r.get("kind") == "step"]


# --- the module's cluster, data and reference ------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return ray_env(tmp_path_factory.mktemp("auth"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "synthetic"
    from alexnet_pp.data import ensure_dataset

    ensure_dataset(reference_cfg(tmp_path_factory.mktemp("probe"), d))
    return d


def reference_cfg(out: Path, data: Path):
    overrides = parse_override_args([*TINY, "--data.synthetic_dir", str(data)])
    overrides["out_dir"] = str(out)
    return load_config("test", None, overrides)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir) -> list[float]:
    """The losses of the same run in one process, without Ray (the engine reproduces it for any layout)."""
    from alexnet_pp.trainer import train_single

    return train_single(reference_cfg(tmp_path_factory.mktemp("single"), data_dir)).losses


class Nodes:
    """The module's cluster and the addresses it has given out."""

    def __init__(self, cluster: LoopbackCluster):
        self.cluster, self.next_ip = cluster, 2 + len(cluster.nodes)

    def top_up(self, count: int = 2) -> None:
        while len(self.cluster.nodes) < count:
            self.cluster.add(f"n{self.next_ip}", Node(f"127.0.0.{self.next_ip}", cpus=2,
                                                      resources={f"node{self.next_ip}": 1}))
            self.next_ip += 1

    def name_of(self, ip: str) -> str:
        return next(name for name, info in self.cluster.nodes.items() if info["ip"] == ip)


@pytest.fixture(scope="module")
def nodes(env):
    tmp = Path(tempfile.mkdtemp(prefix="rayc", dir="/tmp"))  # short: Ray's socket paths are long
    cluster = LoopbackCluster(tmp / "cluster", env, {"n2": Node("127.0.0.2", cpus=2, resources={"node2": 1}),
                                                     "n3": Node("127.0.0.3", cpus=2, resources={"node3": 1})})
    try:
        yield Nodes(cluster)
    finally:
        cluster.close()
        shutil.rmtree(tmp, ignore_errors=True)


# --- 1. spread over two worker nodes, one of them lost ---------------------------------------------


def _discovery_targets(sd_port: int, count: int) -> list[dict] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{sd_port}/targets", timeout=5) as r:
            targets = json.loads(r.read())
    except OSError:
        return None
    return targets if len(targets) == count else None


@pytest.mark.timeout(900)
def test_a_pp2_tp2_job_spreads_over_two_nodes_and_resumes_on_a_node_that_joins_when_one_is_lost(
        nodes, env, data_dir, reference, tmp_path):
    """Four 1-CPU workers on nodes of 2 CPUs: each stage's towers share a node, the stages do not;
    every worker's metrics endpoint binds its own node's address and Prometheus discovery lists it
    there. Then the node of stage 1 is killed whole (raylet and everything under it, SIGKILL) after
    the first complete checkpoint and a new node joins: Ray Train restarts the worker group, which
    resumes from the last complete checkpoint, so at most checkpoint.every_steps steps (plus the one
    in flight) are done again. The run dir is shared; every loss is that of one process."""
    nodes.top_up()
    out, (sd_port,) = tmp_path / "runs", free_ports(1)
    run_dir = out / "test"
    job = Job(job_args(out, data_dir, *PP2_TP2, *SLOW, "--address", nodes.cluster.gcs, "--parallel.max_failures", "2",
                       "--metrics.enabled", "true", "--metrics.host", "node", "--metrics.sd_port", str(sd_port)),
              env, tmp_path / "job.log")
    try:
        targets = wait_for(lambda: _discovery_targets(sd_port, 4), 420, "four discovery targets", job)
        for t in targets:  # each endpoint answers on the address it was listed under
            with urllib.request.urlopen(f"http://{t['targets'][0]}/metrics", timeout=10) as r:
                assert b"alexnet_pp_step" in r.read()
        wait_for(lambda: len(worker_records(run_dir)) == 4, 60, "four worker records", job)
        ip = {rank: w["node_ip"] for rank, w in worker_records(run_dir).items()}
        assert ip[0] == ip[1] and ip[2] == ip[3] and ip[0] != ip[2], ip  # towers together, stages apart
        assert {ip[0], ip[2]} <= {info["ip"] for info in nodes.cluster.nodes.values()}
        for t in targets:
            rank = int(t["labels"]["rank"])
            assert t["targets"][0].rsplit(":", 1)[0] == ip[rank] == t["labels"]["node"], t

        wait_for(lambda: complete_steps(run_dir), 420, "the first complete checkpoint", job)
        killed = nodes.cluster.kill(nodes.name_of(ip[2]))
        killed_at = max(steps_logged(run_dir))
        assert killed
        nodes.top_up()  # a new node joins
        rc = job.wait(timeout=600)
    finally:
        job.stop()
    assert rc == 0, job.output()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ok"] and summary["restarts"] >= 1 and summary["steps"] == STEPS
    resumed = summary["resume_steps"][-1]
    assert resumed is not None and resumed % EVERY == 0 and killed_at - resumed <= EVERY + 1, (killed_at, summary)
    assert summary["loss_steps"] == list(range(1, STEPS + 1))
    assert_close(summary["losses"], reference)  # before the loss and after the resume
    now = {r: w["node_ip"] for r, w in worker_records(run_dir).items()}
    assert ip[2] not in now.values() and ip[0] in now.values(), now  # on the survivor and the new node


# --- 2. a killed driver ----------------------------------------------------------------------------


def _ray(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _job_status(env: dict, address: str, sub_id: str, token: str | None = "the cluster's") -> str:
    """The job's status from the job API itself: what `ray job status` asks, without starting a
    Python process (and taking a core from the job) at every poll. "" while the API cannot say."""
    if token == "the cluster's":
        token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{address}/api/jobs/{sub_id}", headers=headers),
                                    timeout=10) as r:
            return json.loads(r.read())["status"]
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except OSError:
        return ""


def _terminal(status: str) -> bool:
    return status in ("SUCCEEDED", "FAILED", "STOPPED")


def _driver_pids(pids: list[int], marker: str) -> list[int]:
    """The Python process of a submitted job's entrypoint among `pids` (not the shell around it)."""
    out = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv]
        if "python" in Path(args[0]).name and "cluster.job" in args and any(marker in a for a in args):
            out.append(pid)
    return out


@pytest.mark.timeout(900)
def test_a_killed_driver_leaves_complete_checkpoints_and_the_same_command_resumes_from_the_newest(
        nodes, env, data_dir, reference, tmp_path):
    """`ray job submit`, then the job's driver is killed (SIGKILL) and `ray job stop` run: every
    checkpoint marked complete holds every rank's files and loads; submitting the same command again
    resumes from the newest of them and ends with the losses of an uninterrupted run, its summary in the
    job's logs; the job API refuses a client without the cluster's token."""
    from cluster.driver import WORKING_DIR_EXCLUDES
    from cluster.workers import read_worker_files

    nodes.top_up()
    address = nodes.cluster.dashboard
    out = tmp_path / "runs"
    run_dir = out / "test"
    entrypoint = ["python", "-m", "cluster.job", *job_args(out, data_dir, *PP2_TP2, *SLOW)]

    def submit() -> str:
        sub_id = f"alexnet-pp-{secrets.token_hex(3)}"
        r = _ray(env, "job", "submit", "--address", address, "--submission-id", sub_id, "--no-wait",
                 "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"excludes": WORKING_DIR_EXCLUDES}),
                 "--", *entrypoint)
        assert r.returncode == 0, r.stdout + r.stderr
        return sub_id

    first = submit()
    wait_for(lambda: complete_steps(run_dir) or _terminal(_job_status(env, address, first)), 480,
             "the first complete checkpoint", poll=1.0)
    drivers = _driver_pids(nodes.cluster.descendants(), str(out))
    assert len(drivers) == 1, (drivers, _job_status(env, address, first),
                               _ray(env, "job", "logs", "--address", address, first).stdout[-6000:])
    os.kill(drivers[0], signal.SIGKILL)
    _ray(env, "job", "stop", "--address", address, "--no-wait", first)
    wait_for(lambda: _terminal(_job_status(env, address, first)), 120, "the first job to end", poll=1.0)
    workers = [w["pid"] for w in worker_records(run_dir).values()]

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            return True

    wait_for(lambda: all(gone(p) for p in workers), 120, "the workers to go with their driver")
    done = complete_steps(run_dir)
    assert done and max(done) < STEPS, done
    for step in done:  # complete means every part of the network is there, and it loads
        state, _ = load_checkpoint_state(run_dir / "checkpoints" / f"step{step:08d}")
        assert len(state) == 30  # weight and bias of 7 layers × 2 towers, and of fc8

    second = submit()
    wait_for(lambda: _terminal(_job_status(env, address, second)), 600, "the resubmitted job", poll=1.0)
    status = _ray(env, "job", "status", "--address", address, second)  # what a user runs
    logs = _ray(env, "job", "logs", "--address", address, second)
    said = status.stdout + status.stderr
    assert f"'{second}' succeeded" in said, said + logs.stdout[-6000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ok"] and summary["resume_steps"] == [max(done)] and summary["steps"] == STEPS
    assert summary["loss_steps"] == list(range(max(done) + 1, STEPS + 1))
    assert_close(summary["losses"], reference[max(done):])
    # what a user of `ray job submit` reads: the readable summary, never the raw JSON
    assert "job " + summary["job_id"] + f" done: {STEPS} steps" in logs.stdout and '"losses"' not in logs.stdout
    assert summary["layout"] == [2, 2, 1] and set(summary["bubble_per_stage"]) == {"0", "1"}
    assert summary["evals"] and {"top1", "top5", "val_loss"} <= set(summary["evals"][-1])
    files = read_worker_files(run_dir, summary["job_id"])  # every rank's coordinates and process
    assert [(files[r]["stage"], files[r]["tower"]) for r in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # without the token the job API refuses: the auth really is on
    assert _job_status(env, address, second, token=None) == "HTTP 401"
    assert _job_status(env, address, second, token=secrets.token_hex(32)) == "HTTP 403"


# --- 3. elastic data parallelism -------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_an_elastic_job_that_loses_a_node_continues_on_fewer_replicas_with_the_same_global_batch(
        nodes, env, data_dir, tmp_path):
    """(P, T, D) = (1, 2, 2), one replica per node, parallel.elastic on. The node of replica 1 is
    killed and not replaced: the job restarts from the last complete checkpoint on one replica with
    twice the micro-batches (global batch 16 kept), says so in its log and summary, and finishes."""
    nodes.top_up()
    out = tmp_path / "runs"
    run_dir = out / "test"
    job = Job(job_args(out, data_dir, "--parallel.tp", "2", "--parallel.dp", "2", *SLOW, "--address",
                       nodes.cluster.gcs, "--parallel.elastic", "true", "--parallel.elastic_wait_s", "10"),
              env, tmp_path / "job.log")
    try:
        wait_for(lambda: complete_steps(run_dir), 420, "the first complete checkpoint", job)
        records = worker_records(run_dir)
        assert records[2]["node_ip"] == records[3]["node_ip"] != records[0]["node_ip"], records
        nodes.cluster.kill(nodes.name_of(records[2]["node_ip"]))
        rc = job.wait(timeout=600)
    finally:
        job.stop()
    log = job.output(tail=None)
    assert rc == 0, log[-8000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ok"] and summary["steps"] == STEPS and summary["layout"] == [1, 2, 1]
    assert summary["replica_changes"] == [{"start": 2, "replicas": [2, 1], "micro_batches": [2, 4],
                                           "global_batch": 16}]
    assert "elastic: a node was lost and not replaced" in log and "replicas 2 → 1" in log
    assert "elastic: continued on 1 replica instead of 2 (micro-batches 2 → 4, global batch 16 kept)" in log
    resumed = summary["resume_steps"][-1]
    assert resumed is not None and resumed % EVERY == 0 and summary["loss_steps"] == list(range(1, STEPS + 1))
    records = worker_records(run_dir)
    newest = max(w["attempt"] for w in records.values())
    assert sorted(r for r, w in records.items() if w["attempt"] == newest) == [0, 1]  # one replica: two ranks
