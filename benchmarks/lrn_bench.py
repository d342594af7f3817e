"""Thin wrapper: `python -m benchmarks.lrn_bench ARGS` ≡ `alexnet-pp bench lrn ARGS` (cluster/bench/lrn.py)."""

import sys

from cluster.bench.cli import main_bench

if __name__ == "__main__":
    sys.exit(main_bench(["lrn", *sys.argv[1:]]))
