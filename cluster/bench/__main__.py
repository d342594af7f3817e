"""`python -m cluster.bench NAME ARGS` ≡ `alexnet-pp bench NAME ARGS`."""

import sys

from cluster.bench.cli import main_bench

sys.exit(main_bench(sys.argv[1:]))
