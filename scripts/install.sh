#!/usr/bin/env bash
# Install diffstream and everything its tests need into the current Python environment.
#
# torch: if no torch is importable yet, install the CPU build (torch==2.13.0), so pip
# never pulls a multi-GB CUDA build by surprise. GPU users: install the torch build for
# your CUDA first (https://pytorch.org/get-started/locally/), then run this script.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[dev]"
# The browser test drives Debian's Chromium with Playwright (never `playwright install`,
# which downloads a browser). Without root or apt the test skips and says why.
if [ "${DIFFSTREAM_SKIP_BROWSER:-0}" != "1" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium) >/dev/null 2>&1 \
      || echo "install.sh: could not install chromium; the browser test will be skipped" >&2
  fi
fi
