"""`python -m cluster.job ARGS`: the `ray job submit` entrypoint, exactly `alexnet-pp train --distributed ARGS`.

    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env-json '{"excludes": [".venv*", "data", "runs", ".git"]}' \\
        -- python -m cluster.job --preset demo --pp 2 --tp 2

It accepts every argument `alexnet-pp train` does (the same parser, cluster/cli.py) and always runs
through the Ray job path (cluster/driver.py), joining the cluster of the submitted job. Exit code:
0 done, 1 the job failed, 2 a configuration error (nothing started).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from alexnet_pp.config import RunConfig
from alexnet_pp.layout import Layout
from cluster.cli import main as cli_main
from cluster.cli import parse
from cluster.cli import resolve as resolve_args


def resolve(argv: Sequence[str]) -> tuple[RunConfig, Layout]:
    """The config and layout this entrypoint would run for `argv` (what deploy files are checked with)."""
    _, args, extra = parse(["train", "--distributed", *argv])
    return resolve_args(args, extra)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli_main(["train", "--distributed", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
