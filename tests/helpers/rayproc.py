"""Processes of the Ray tests: environments, free loopback ports, jobs run as a user runs them, and
stopping exactly the processes a test started (by PID: its own session), nothing else.

The pytest process itself never imports Ray here: Ray reads its authentication mode and caches its
token once per process, so every cluster and job runs in a child process with the environment of
`ray_env`.
"""

from __future__ import annotations

import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def ray_env(token_dir: Path, auth: bool = True, **extra: str) -> dict[str, str]:
    """Environment for Ray processes of a test: token auth with a token file of the test's own
    (never ~/.ray/auth_token), loopback only, the repository's code first on the path."""
    env = os.environ.copy()
    env.pop("RAY_ADDRESS", None)
    token = token_dir / "token"
    if not token.exists():
        token_dir.mkdir(parents=True, exist_ok=True)
        token.write_text(secrets.token_hex(32))
    env.update({"RAY_AUTH_MODE": "token" if auth else "disabled", "RAY_AUTH_TOKEN_PATH": str(token),
                "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # a driver attaches to the raylet on 127.0.0.1
                "GLOO_SOCKET_IFNAME": "lo"})  # gloo binds the loopback interface, whatever the hostname resolves to
    env.update(extra)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH", "")) if x)
    return env


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_range(size: int) -> int:
    """The first port of `size` consecutive free ports (Ray's worker port range)."""
    for _ in range(200):
        base = random.randrange(20000, 30000 - size)
        socks = []
        try:
            for port in range(base, base + size):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def session_pids(sid: int) -> list[int]:
    """Live processes of session `sid` (everything a `start_new_session=True` child left behind)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[3]) == sid and fields[0] != "Z" and int(d.name) != os.getpid():
            out.append(int(d.name))
    return out


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children, their children, …), by parent PID."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def start_time(pid: int) -> Optional[int]:
    """The process's start time in clock ticks since boot (tells a PID's process from a later one)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rfind(")") + 2 :].split()[19])


def kill_if_same(pid: int, started: Optional[int]) -> None:
    """SIGKILL `pid` if it is still the process that started at `started`."""
    if started is not None and start_time(pid) == started:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_session(sid: int, grace: float = 5.0) -> None:
    """SIGTERM then SIGKILL, by PID, every process of the session we started (Ray respawns some
    dashboard children while dying, so repeat until none is left; 30 s at most)."""
    deadline = time.monotonic() + 30
    sig = signal.SIGTERM
    while time.monotonic() < deadline:
        pids = session_pids(sid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + grace
        while time.monotonic() < end and session_pids(sid):
            time.sleep(0.2)
        sig = signal.SIGKILL
        grace = 1.0


class Job:
    """`python -m cluster.job ARGS` in a session of its own, its output in `log`."""

    def __init__(self, args: Sequence[str], env: dict[str, str], log: Path):
        self.log = log
        self._out = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "cluster.job", *args], env=env, cwd=REPO,
                                     stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        kill_session(self.proc.pid)
        self._out.close()

    def output(self, tail: Optional[int] = 8000) -> str:
        text = self.log.read_text(errors="replace")
        return text[-tail:] if tail else text


def run_job_cli(args: Sequence[str], env: dict[str, str], log: Path, timeout: float) -> tuple[int, str]:
    """Run a job to its end; its exit code and its whole output."""
    job = Job(args, env, log)
    rc = job.wait(timeout)
    return rc, job.output(tail=None)
