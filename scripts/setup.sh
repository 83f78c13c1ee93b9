#!/usr/bin/env bash
# Create .venv with trainguard (editable) and its extras. torch is pinned to the 2.13.0 CPU
# wheel: an unpinned torch would pull several GB of CUDA packages.
#   bash scripts/setup.sh          # library, CLI, zoo, report extras
#   bash scripts/setup.sh --test   # the same plus pytest and headless Chromium for the report test
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q torch==2.13.0
extras="all"
if [ "${1:-}" = "--test" ]; then
  extras="all,test"
fi
# torch named again in the same command: the framework extras (lightning, transformers,
# accelerate) then install beside the pinned CPU wheel instead of pulling a CUDA torch
.venv/bin/python -m pip install -q torch==2.13.0 -e ".[$extras]"
# peer baselines for the zoo and bench/overhead.py (optional; they need nothing beyond torch,
# so --no-deps keeps pip from touching the pinned torch)
.venv/bin/python -m pip install -q --no-deps zclip==1.0.0 autoclip==0.2.1 \
  || echo "setup: zclip/autoclip not installed; the zoo and benchmarks will skip them" >&2
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  # Debian's Chromium, for the doctor report's headless-browser test
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; the browser test will be skipped" >&2
  else
    echo "setup: chromium not found and not root; the browser test will be skipped" >&2
  fi
fi
