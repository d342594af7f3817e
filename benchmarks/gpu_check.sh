#!/usr/bin/env bash
# The GPU checks in one run, for a machine with one CUDA GPU and torch + triton (+ torchvision for
# nvJPEG) installed, most important first: the training-step throughput of the paper network, plain,
# engine and engine from JPEG shards (alexnet-pp bench gpu: cluster/bench/gpu.py); the CUDA tests
# (fused Triton LRN, the engine on cuda:nccl with bf16, GPU decoding and augmentation against the
# CPU path); the data pipelines with their GPU rows (alexnet-pp bench data); the LRN kernel timings.
#
#   [STEPS="gpu_bench tests_cuda data_bench lrn_bench"] benchmarks/gpu_check.sh [OUT_DIR]
#
# Packages the machine lacks (deepspeed and its pure-Python needs) may sit in .whl/ as wheels, and
# deepspeed's source tree in .whl/src (`make gpu-wheels` gathers both): they are installed to /tmp/site first.
# Each step has its own time limit and a failed step does not stop the next; every step's log lands in OUT_DIR.
set -u
OUT_DIR=${1:-${OUT:-/tmp/alexnet-pp-gpu-check}}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda
PY=${PYTHON:-python3}
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "wheel install failed"
  export PYTHONPATH=$PWD:/tmp/site:$PWD/.whl/src${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  "$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
try:
    import triton; print("triton", triton.__version__)
except Exception as e: print("triton missing:", e)
try:
    import deepspeed; print("deepspeed", deepspeed.__version__)
except Exception as e: print("deepspeed missing:", e)
print("nccl", torch.cuda.nccl.version())
EOF
} 2>&1 | tee "$OUT_DIR/env.txt"

STEPS=${STEPS:-gpu_bench tests_cuda data_bench lrn_bench}  # a subset reruns only those
step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  echo "=== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-40}" "$OUT_DIR/$name.log"
  echo "=== $name rc=$rc in $((SECONDS - t0))s"
}

TAIL=40 step gpu_bench 240 "$PY" -m cluster.bench gpu --out "$OUT_DIR/gpu"
TAIL=15 step tests_cuda 150 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/ops/test_lrn.py tests/cluster/test_engine.py \
  tests/cluster/test_device_feed.py tests/cluster/test_feeds.py tests/alexnet_pp/data/test_augment.py
TAIL=30 step data_bench 90 "$PY" -m cluster.bench data --workers 8 --images 4000 --batch 128 --epochs 2 \
  --only shards,torchvision,gpu_uint8,gpu_decode --data /tmp/alexnet-pp-data-bench --out "$OUT_DIR/data"
TAIL=12 step lrn_bench 45 bash -c "$PY -m cluster.bench lrn --device cuda --out $OUT_DIR/lrn-fp32 && $PY -m cluster.bench lrn --device cuda --dtype bfloat16 --out $OUT_DIR/lrn-bf16 && $PY -m cluster.bench lrn --device cuda --dtype bfloat16 --channels-last --out $OUT_DIR/lrn-bf16-cl"
