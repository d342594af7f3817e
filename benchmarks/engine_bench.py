"""Thin wrapper: `python -m benchmarks.engine_bench ARGS` ≡ `alexnet-pp bench engine ARGS` (cluster/bench/engine.py)."""

import sys

from cluster.bench.cli import main_bench

if __name__ == "__main__":
    sys.exit(main_bench(["engine", *sys.argv[1:]]))
