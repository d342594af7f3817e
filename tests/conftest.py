import os
import sys

# DeepSpeed picks its accelerator at import; on machines without CUDA make that explicit.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# Ray Train's controller polls its workers every 2 s by default, so every job of the suite waited up
# to that long to see its workers start, end or die; the test jobs last seconds, so poll 4 times a
# second (read by the controller, a process of every cluster the tests start from this environment).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Each worker group also gets a preemption watcher: one more actor process (about 3.5 s of CPU to
# start on this machine) that only logs nodes being drained, which no test cluster does.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# Test-only helpers (shard sets, stream comparison) live in tests/helpers, outside the package;
# tests import them as top-level modules (`from shardsets import make_shards`).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers"))
