# Two entry points for a fresh machine (both idempotent; a second run reuses .venv):
#   make demo   — set up, then train the demo on the embedded dataset as a (2,2,1) Ray job
#   make test   — set up, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; on a GPU machine use e.g. TORCH_SPEC="torch==2.13.0" with a CUDA index.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.alexnet-pp-installed

.PHONY: setup demo test test-fast bench-lrn bench-data bench-engine bench-gpu clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	@touch $@

# The demo as a distributed job: 2 pipeline stages × 2 towers on a local Ray cluster (4 workers).
demo: setup
	$(BIN)/alexnet-pp train --preset demo --pp 2 --tp 2

# the monitoring tests start a real Prometheus: installed here when the machine can, else one clear line
test: setup
	bash .ci/ensure-prometheus
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not e2e"

bench-lrn: setup
	$(BIN)/python -m benchmarks.lrn_bench

# The baseline (torchvision ImageFolder) needs torchvision, which only imports beside torch 2.14.1:
# it lives in a second venv, .venv-tv.
bench-data: setup
	bash benchmarks/setup_tv_venv.sh && .venv-tv/bin/python -m benchmarks.data_bench

bench-engine: setup
	$(BIN)/python -m benchmarks.engine_bench

# on a CUDA machine whose python3 has torch + triton (the CUDA tests, LRN kernel, training-step throughput)
bench-gpu:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) runs data
