import os

# DeepSpeed picks its accelerator at import; on machines without CUDA make that explicit.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
