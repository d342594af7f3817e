#!/usr/bin/env bash
# A separate venv for the data benchmark's torchvision baseline (idempotent).
# torchvision does not import beside the project's torch 2.13 CPU build; this matching pair
# does. The project itself is made importable with `pip install -e .` when possible, else a
# .pth file pointing at the repository (the same as PYTHONPATH=<repo>).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VENV_TV:-$REPO/.venv-tv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.tv-installed"

if [[ -f "$STAMP" ]] && "$VENV/bin/python" -c "import torchvision, simplejpeg, alexnet_pp.data" 2>/dev/null; then
  echo "$VENV ready"; exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
"$VENV/bin/python" -m pip install -q numpy pillow simplejpeg "webdataset==1.0.2" tqdm pyyaml
if ! "$VENV/bin/python" -m pip install -q --no-deps -e "$REPO" 2>/dev/null; then
  site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "$REPO" > "$site/alexnet_pp_repo.pth"
fi
"$VENV/bin/python" -c "import torch, torchvision, alexnet_pp.data; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
touch "$STAMP"
echo "$VENV ready"
