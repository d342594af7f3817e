"""Ray's own checks, run in a subprocess (importing ray in the test process would fix its auth mode
for the whole session before other tests' fixtures set it).

    ray_checks(cluster_yaml=path, start_argvs=[["--head", ...], ...])

validates a launcher config the way `ray up` does first (prepare_config + validate_config, which includes
ray/autoscaler/ray-schema.json) and parses each `ray start` argument list with the installed Ray's own
command-line definition, returning the parsed options (an unknown or malformed option raises).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

_SCRIPT = r"""
import json, sys
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.scripts.scripts import start

path, argvs = sys.argv[1], json.loads(sys.argv[2])
if path:
    validate_config(prepare_config(yaml.safe_load(open(path))))
out = []
for argv in argvs:
    ctx = start.make_context("start", list(argv))
    out.append({k: v for k, v in ctx.params.items() if v not in (None, False, (), "")})
print("RESULT " + json.dumps(out, default=str))
"""


def ray_checks(cluster_yaml: Optional[Path] = None, start_argvs: Sequence[Sequence[str]] = ()) -> list[dict]:
    r = subprocess.run([sys.executable, "-c", _SCRIPT, str(cluster_yaml or ""), json.dumps([list(a) for a in start_argvs])],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    line = next(l for l in r.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])
