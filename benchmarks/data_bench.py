"""Thin wrapper: `python -m benchmarks.data_bench ARGS` ≡ `alexnet-pp bench data ARGS` (cluster/bench/data.py)."""

import sys

from cluster.bench.cli import main_bench

if __name__ == "__main__":
    sys.exit(main_bench(["data", *sys.argv[1:]]))
