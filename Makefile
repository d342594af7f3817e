# Two entry points for a fresh machine (both idempotent; a second run reuses .venv):
#   make demo   — set up, then train the demo on the embedded dataset as a (2,2,1) Ray job
#   make test   — set up, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; on a GPU machine use e.g. TORCH_SPEC="torch==2.13.0" with a CUDA index.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.alexnet-pp-installed

.PHONY: setup demo test test-fast bench-lrn bench-data bench-engine bench-scaling bench-gpu gpu-wheels clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m cluster.jit_builds  # DeepSpeed's CPU comm op, compiled now rather than in the first job's workers
	@touch $@

# The demo as a distributed job: 2 pipeline stages × 2 towers on a local Ray cluster (4 workers).
demo: setup
	$(BIN)/alexnet-pp train --preset demo --pp 2 --tp 2

# the monitoring tests start a real Prometheus: installed here when the machine can, else one clear line
test: setup
	bash .ci/ensure-prometheus
	$(BIN)/python -m pytest -q --durations=25

test-fast: setup
	$(BIN)/python -m pytest -q -m "not e2e"

# Every benchmark is `alexnet-pp bench NAME` and writes NAME.json / .csv / .md under runs/bench/NAME.
bench-lrn: setup
	$(BIN)/alexnet-pp bench lrn

# The baseline (torchvision ImageFolder) needs torchvision, which only imports beside torch 2.14.1:
# --baseline sets up a second venv, .venv-tv (torch 2.14.1 + torchvision 0.29.1), once, and runs the benchmark there.
bench-data: setup
	$(BIN)/alexnet-pp bench data --baseline

bench-engine: setup
	$(BIN)/alexnet-pp bench engine

# layouts over 1, 2 and 4 workers against the plain trainer, DDP, DeepSpeed's partition and the cost model
bench-scaling: setup
	$(BIN)/alexnet-pp bench scaling --workers 1,2,4

# on a CUDA machine whose python3 has torch + triton (the CUDA tests, LRN kernel, training-step throughput)
bench-gpu:
	bash benchmarks/gpu_check.sh

# .whl/: what bench-gpu needs beside torch, for a CUDA machine without a package index (Python 3.12 wheels)
gpu-wheels: setup
	bash benchmarks/gpu_wheels.sh

clean:
	rm -rf $(VENV) runs data
