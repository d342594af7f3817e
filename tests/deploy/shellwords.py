"""Command lines from deploy/, split into words by the shells that run them on a cluster.

`shlex.split` is not what a cluster uses: it knows no brace expansion, no `$(...)`, no functions.
These helpers hand a command line to the real shell instead, with the cluster's programs (ray, sudo,
curl, kubectl, ...) replaced by shell functions that only record how they were called:

    calls = run_recorded("RAY_AUTH_MODE=token ray start --head", record=["ray"])
    calls[0].argv == ["start", "--head"]; calls[0].env["RAY_AUTH_MODE"] == "token"

Nothing recorded is executed. Import as `from tests.deploy.shellwords import ...`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import list2cmdline
from typing import Mapping, Optional, Sequence

BASH = shutil.which("bash") or "/bin/bash"
SH = "/bin/sh"
# What a recording function reports about its caller's environment.
ENV_KEYS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_HEAD_IP",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
_US, _RS, _GS = "\x1f", "\x1e", "\x1d"  # separators: never in a command line of ours


@dataclass
class Call:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    stdin: Optional[str] = None  # what a recorded `tee` was given


def _recorder(names: Sequence[str], log: Path) -> str:
    env = "".join(f'printf "{_US}%s=%s" {k} "${{{k}-}}" >> "$__REC"; ' for k in ENV_KEYS)
    funcs = [
        f'__rec() {{ printf "%s" "$1" >> "$__REC"; shift; printf "{_RS}" >> "$__REC"; '
        f'for a in "$@"; do printf "%s{_US}" "$a" >> "$__REC"; done; printf "{_RS}" >> "$__REC"; {env}'
        f'if [ "$1" = tee ]; then printf "{_RS}" >> "$__REC"; cat >> "$__REC"; fi; printf "{_GS}" >> "$__REC"; }}; '
    ]
    funcs += [f'{n}() {{ __rec {n} "$@"; }}; ' for n in names]
    return f'__REC={log}; export __REC; ' + "".join(funcs)


def _parse(log: Path) -> list[Call]:
    calls = []
    text = log.read_text() if log.exists() else ""
    for line in text.split(_GS)[:-1]:
        parts = line.split(_RS)
        name, args, env = parts[0], parts[1], parts[2]
        argv = args.split(_US)[:-1] if args else []
        envs = dict(kv.split("=", 1) for kv in env.split(_US) if kv)
        calls.append(Call(name, argv, envs, parts[3] if len(parts) > 3 else None))
    return calls


def run_recorded(script: str, record: Sequence[str], fakes: Optional[Mapping[str, str]] = None,
                 shell: str = BASH, env: Optional[Mapping[str, str]] = None,
                 cwd: Optional[Path] = None) -> list[Call]:
    """Run `script` in `shell -c`, with each command in `record` replaced by a function that records its
    arguments (and, for `sudo tee`, its input), and each command in `fakes` by a function with that body.
    Returns the recorded calls in order; raises CalledProcessError when the script fails."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "calls"
        prefix = _recorder(record, log) + "".join(f"{n}() {{ {body}; }}; " for n, body in (fakes or {}).items())
        run_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "LC_ALL": "C", **(env or {})}
        subprocess.run([shell, "-c", prefix + script + "\nwait"], env=run_env, check=True, capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL, cwd=cwd)
        return _parse(log)


def shell_words(cmdline: str, shell: str = BASH) -> list[str]:
    """The words `shell -c` makes of a simple command line (its expansions included)."""
    first = cmdline.split(None, 1)[0]
    [call] = run_recorded(cmdline, record=[first], shell=shell)
    return [first, *call.argv]


def kuberay_submitted_entrypoint(entrypoint: str, address: str = "http://head-svc:8265",
                                 submission_id: str = "job-1") -> list[str]:
    """The entrypoint words `ray job submit` receives from KubeRay's submitter.

    KubeRay (ray-operator/controllers/ray/common/job.go, GetK8sJobCommand) trims the entrypoint, joins
    `ray job submit --address A --no-wait --submission-id ID -- <entrypoint> ;` with single spaces and
    runs the result with `/bin/bash -c --`."""
    cmd = " ".join(["ray", "job", "submit", "--address", address, "--no-wait", "--submission-id", submission_id,
                    "--", entrypoint.strip(), ";"])
    calls = [c for c in run_recorded(cmd, record=["ray"]) if c.argv[:2] == ["job", "submit"]]
    assert len(calls) == 1, calls
    argv = calls[0].argv
    return argv[argv.index("--") + 1:]


def job_supervisor_words(entrypoint_words: Sequence[str], shell: str = SH) -> list[str]:
    """The argv of the job's driver: `ray job submit` sends list2cmdline(entrypoint words) as the
    entrypoint, and Ray's job supervisor runs it with subprocess.Popen(..., shell=True), i.e. `/bin/sh -c`
    (dash on Debian/Ubuntu images, bash on some others: pass `shell` to check both)."""
    entrypoint = list2cmdline(list(entrypoint_words))
    first = entrypoint_words[0]
    [call] = run_recorded(entrypoint, record=[first], shell=shell)
    return [first, *call.argv]


def documented_command(text: str, starts_with: str) -> str:
    """The shell command a file documents in its `#` comments: the comment line that starts with
    `starts_with` and the lines its trailing backslashes continue onto, comment marks removed."""
    lines = [line.lstrip("#").strip() for line in text.splitlines() if line.lstrip().startswith("#")]
    start = next(i for i, line in enumerate(lines) if line.startswith(starts_with))
    out = []
    for line in lines[start:]:
        out.append(line)
        if not line.endswith("\\"):
            break
    return "\n".join(out)
