#!/usr/bin/env bash
# What benchmarks/gpu_check.sh needs beside torch, triton and torchvision, gathered into .whl/ for a
# CUDA machine that cannot reach a package index: binary wheels for its Python (default 3.12, x86-64
# Linux) at the versions this checkout's venv runs, and DeepSpeed's installed tree in .whl/src
# (DeepSpeed is published only as a source distribution; its tree is pure Python and builds its ops
# just in time). gpu_check.sh installs .whl/*.whl and puts .whl/src on the path.
#
#   make setup && benchmarks/gpu_wheels.sh [PYTHON_VERSION]     # then copy the checkout, .whl/ included
set -euo pipefail
PYV=${1:-3.12}
VENV_PY=${VENV_PY:-.venv/bin/python}
OUT=.whl
# deepspeed's pure-Python needs the CUDA image may lack, and the data path's packages
PACKAGES="pydantic pydantic_core annotated-types typing-inspection hjson webdataset braceexpand simplejpeg"

[ -x "$VENV_PY" ] || { echo "no $VENV_PY: run make setup first (the versions come from its venv)" >&2; exit 2; }
mkdir -p "$OUT/src"
for name in $PACKAGES; do
  version=$("$VENV_PY" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$version" ] || { echo "$name is not installed in $VENV_PY's venv" >&2; exit 2; }
  "$VENV_PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$OUT" "$name==$version"
done
site=$("$VENV_PY" -c 'import importlib.util as u, os; print(os.path.dirname(u.find_spec("deepspeed").submodule_search_locations[0]))')
rm -rf "$OUT/src/deepspeed" "$OUT"/src/deepspeed-*.dist-info
cp -r "$site/deepspeed" "$site"/deepspeed-*.dist-info "$OUT/src/"
find "$OUT/src" -name __pycache__ -prune -exec rm -rf {} +
du -sh "$OUT"
ls "$OUT"
