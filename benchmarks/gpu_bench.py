"""Thin wrapper: `python -m benchmarks.gpu_bench ARGS` ≡ `alexnet-pp bench gpu ARGS` (cluster/bench/gpu.py)."""

import sys

from cluster.bench.cli import main_bench

if __name__ == "__main__":
    sys.exit(main_bench(["gpu", *sys.argv[1:]]))
