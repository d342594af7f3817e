import os
import sys

# DeepSpeed picks its accelerator at import; on machines without CUDA make that explicit.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# Test-only helpers (shard sets, stream comparison) live in tests/helpers, outside the package;
# tests import them as top-level modules (`from shardsets import make_shards`).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers"))
