"""A Ray cluster of several nodes on this machine's loopback addresses, for tests.

    cluster = LoopbackCluster(tmp, env, nodes={"a": Node("127.0.0.2", cpus=2), "b": Node("127.0.0.3", cpus=2)})
    cluster.gcs, cluster.dashboard           # 127.0.0.1:port, http://127.0.0.1:port (the job API)
    cluster.kill("b")                        # the node's raylet and every process under it, SIGKILL by PID
    cluster.add("c", Node("127.0.0.4", cpus=2))
    cluster.close()

A child process in a session of its own runs `ray.cluster_utils.Cluster`: a head on 127.0.0.1 with
no CPUs (so training workers land only on the worker nodes) and a dashboard for `ray job submit`,
then one Ray node per entry, each on its own address in 127.0.0.0/8 with its own CPUs and custom
resources. Every port is on loopback, every process in that session; `close()` asks the child to
shut the cluster down, then stops whatever is left of the session by PID. The test process never
imports Ray. Commands and answers travel as JSON lines over the child's stdin and stdout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HELPERS = Path(__file__).resolve().parent


@dataclass
class Node:
    ip: str  # an address in 127.0.0.0/8
    cpus: int = 2
    resources: dict[str, float] = field(default_factory=dict)


class LoopbackCluster:
    def __init__(self, tmp: Path, env: dict[str, str], nodes: dict[str, Node], head_cpus: int = 0,
                 timeout_s: float = 240):
        from rayproc import free_ports, kill_session

        self._kill_session = kill_session
        ports = free_ports(4)
        env = {**env, "AUTOSCALER_METRIC_PORT": str(ports[2]), "DASHBOARD_METRIC_PORT": str(ports[3])}
        spec = {"temp_dir": str(tmp), "dashboard_port": ports[0], "agent_port": ports[1], "head_cpus": head_cpus,
                "nodes": {name: asdict(n) for name, n in nodes.items()}}
        self._log = open(tmp.parent / f"{tmp.name}.log", "w")
        self.proc = subprocess.Popen([sys.executable, str(HELPERS / "loopback_cluster.py"), json.dumps(spec)],
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, start_new_session=True, cwd=tmp.parent)
        try:
            ready = self._answer(timeout_s)
        except BaseException:
            self.close()
            raise
        self.gcs, self.dashboard = ready["gcs"], ready["dashboard"]
        self.nodes: dict[str, dict[str, Any]] = ready["nodes"]

    def _answer(self, timeout_s: float) -> dict[str, Any]:
        import select

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the cluster process exited ({self.proc.returncode}); see {self._log.name}")
            ready, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            if ready:
                line = self.proc.stdout.readline()
                if line.startswith("{"):
                    answer = json.loads(line)
                    if "error" in answer:
                        raise RuntimeError(f"cluster process: {answer['error']}")
                    return answer
        raise TimeoutError(f"no answer from the cluster process in {timeout_s} s; see {self._log.name}")

    def _ask(self, timeout_s: float = 120, **command: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._answer(timeout_s)

    def add(self, name: str, node: Node) -> dict[str, Any]:
        info = self._ask(cmd="add", name=name, node=asdict(node))["node"]
        self.nodes[name] = info
        return info

    def kill(self, name: str) -> list[int]:
        """SIGKILL the node's raylet and every process below it (its workers, agents), by PID."""
        pids = self._ask(cmd="kill", name=name)["killed"]
        self.nodes.pop(name, None)
        return pids

    def session_pids(self) -> list[int]:
        from rayproc import session_pids

        return session_pids(self.proc.pid)

    def descendants(self) -> list[int]:
        """Every process below the cluster process, also those Ray put in sessions of their own (the
        driver of a submitted job and its watcher)."""
        from rayproc import descendants

        return descendants(self.proc.pid)

    def close(self) -> None:
        from rayproc import kill_if_same, start_time

        others = {pid: start_time(pid) for pid in self.descendants()}
        if self.proc.poll() is None:
            try:
                self._ask(timeout_s=90, cmd="quit")
            except Exception:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._kill_session(self.proc.pid)
        for pid, started in others.items():  # left their session: stopped by PID, if still the same process
            kill_if_same(pid, started)
        self._log.close()


# --- the child process ------------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    sys.path.insert(0, str(HELPERS))
    from rayproc import descendants

    return descendants(pid)


def _node_info(node: Any) -> dict[str, Any]:
    from ray._private import ray_constants

    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    return {"ip": node.node_ip_address, "node_id": node.node_id, "raylet_pid": raylet}


def _serve(spec: dict[str, Any]) -> None:
    import ray
    from ray.cluster_utils import Cluster

    def say(obj: dict[str, Any]) -> None:
        print(json.dumps(obj), flush=True)

    head = {"node_ip_address": "127.0.0.1", "num_cpus": spec["head_cpus"], "include_dashboard": True,
            "dashboard_host": "127.0.0.1", "dashboard_port": spec["dashboard_port"],
            "dashboard_agent_listen_port": spec["agent_port"], "temp_dir": spec["temp_dir"]}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    nodes: dict[str, Any] = {}

    def add(name: str, n: dict[str, Any]) -> dict[str, Any]:
        nodes[name] = cluster.add_node(node_ip_address=n["ip"], num_cpus=n["cpus"],
                                       resources=n["resources"] or None, temp_dir=spec["temp_dir"])
        return _node_info(nodes[name])

    try:
        infos = {name: add(name, n) for name, n in spec["nodes"].items()}
        cluster.wait_for_nodes()
        say({"gcs": cluster.address, "dashboard": f"http://127.0.0.1:{spec['dashboard_port']}", "nodes": infos})
        for line in sys.stdin:
            cmd = json.loads(line)
            try:
                if cmd["cmd"] == "add":
                    say({"node": add(cmd["name"], cmd["node"])})
                elif cmd["cmd"] == "kill":
                    node = nodes.pop(cmd["name"])
                    roots = [p.process.pid for procs in node.all_processes.values() for p in procs]
                    pids = sorted({*roots, *(d for r in roots for d in _descendants(r))})
                    for pid in pids:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    for procs in node.all_processes.values():
                        for p in procs:
                            p.process.wait()  # reap them: no zombies left behind
                    cluster.worker_nodes.discard(node)
                    say({"killed": pids})
                elif cmd["cmd"] == "quit":
                    break
            except Exception as e:
                say({"error": f"{type(e).__name__}: {e}"})
    except Exception as e:
        say({"error": f"{type(e).__name__}: {e}"})
    finally:
        try:
            cluster.shutdown()
        finally:
            say({"bye": True})
            ray.shutdown()


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))
