#!/usr/bin/env bash
# Install diffstream into a virtual environment: the .venv folder of this repository, or
# the venv you are in. Run `bash scripts/install.sh --help` for what it installs and why.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0
CPU_INDEX=https://download.pytorch.org/whl/cpu

usage() {
  cat <<EOF
usage: bash scripts/install.sh [--dev] [--dry-run] [--help]

Installs diffstream, editable, with what its commands need:
  venv       .venv in this repository (created with \${PYTHON:-python3}), unless a venv is
             active (VIRTUAL_ENV set): then that one. Debian's own Python refuses pip
             installs outside a venv (PEP 668). DIFFSTREAM_VENV=DIR picks another folder.
  torch      torch==$TORCH_VERSION, only if the venv cannot import torch yet (an installed
             torch is kept, e.g. a GPU build you chose):
               - an NVIDIA GPU (nvidia-smi works): the default index's build (CUDA);
               - otherwise the CPU build from $CPU_INDEX
                 (10 s timeout), else the default index's torch==$TORCH_VERSION;
               - CI=true skips the CPU index (CI machines have the wheel locally).
             DIFFSTREAM_TORCH_INDEX=URL installs torch from URL (e.g. a CUDA index from
             pytorch.org); DIFFSTREAM_TORCH_INDEX=skip goes straight to the default index.
  runtime    pip install -e '.[server]': diffusers, transformers, PyAV, OpenCV, ... (for
             diffstream run / edit / eval / bench) plus fastapi, uvicorn and websockets
             (for diffstream serve, the live web demo).
  --dev      (also when CI=true) pip install -e '.[dev]': the test tools: pytest, httpx,
             playwright (drives the browser test), ray (Fairy's workers), matplotlib
             (eval --plot); and, as root with apt-get, Debian's chromium for the browser
             test (DIFFSTREAM_SKIP_BROWSER=1 skips it; without it that test is skipped).
Extras for users without --dev: pip install -e '.[ray]' (diffstream edit --workers),
pip install -e '.[plot]' (diffstream eval --plot), pip install -e '.[openvino]'
(--backend openvino).

  --dry-run  print the commands instead of running them (nothing is created or installed)
EOF
}

DEV=0
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    --dry-run) DRY=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
  esac
done
CI=${CI:-}
if [ "$CI" = "true" ]; then DEV=1; fi

say() { echo "install.sh: $*"; }
run() {
  if [ "$DRY" = 1 ]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

# --- the venv ----------------------------------------------------------------------
if [ -n "${VIRTUAL_ENV:-}" ]; then
  PY="$VIRTUAL_ENV/bin/python"
  say "venv: using the active venv $VIRTUAL_ENV"
else
  VENV=${DIFFSTREAM_VENV:-.venv}
  PY="$VENV/bin/python"
  if [ -x "$PY" ]; then
    say "venv: using $VENV (already there)"
  else
    BASE=${PYTHON:-python3}
    say "venv: creating $VENV with $BASE: keeps diffstream's packages apart from the system's (PEP 668)"
    if [ "$DRY" = 1 ]; then
      run "$BASE" -m venv "$VENV"
    elif ! "$BASE" -m venv "$VENV"; then
      say "could not create a venv with $BASE; on Debian/Ubuntu: apt-get install python3-venv" >&2
      exit 1
    fi
  fi
fi
# -qq: errors only (machine-wide pip settings can add screens of harmless warnings).
PIP=("$PY" -m pip install -qq)

# --- torch -------------------------------------------------------------------------
have_torch() { [ -x "$PY" ] && "$PY" -c "import torch" >/dev/null 2>&1; }
has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
TORCH_INDEX=${DIFFSTREAM_TORCH_INDEX:-}

if have_torch; then
  say "torch: $("$PY" -W ignore -c 'import torch; print(torch.__version__)') already installed, kept"
elif [ -n "$TORCH_INDEX" ] && [ "$TORCH_INDEX" != "skip" ]; then
  say "torch: torch==$TORCH_VERSION from $TORCH_INDEX (DIFFSTREAM_TORCH_INDEX): the tensor library the models run on"
  run "${PIP[@]}" --index-url "$TORCH_INDEX" "torch==$TORCH_VERSION"
elif has_gpu; then
  say "torch: CUDA build (torch==$TORCH_VERSION from the default index; nvidia-smi found a GPU): the tensor library the models run on"
  run "${PIP[@]}" "torch==$TORCH_VERSION"
elif [ "$TORCH_INDEX" = "skip" ] || [ "$CI" = "true" ]; then
  why=$([ "$CI" = "true" ] && echo "CI=true" || echo "DIFFSTREAM_TORCH_INDEX=skip")
  say "torch: CPU machine; torch==$TORCH_VERSION from the default index ($why: no CPU-index attempt)"
  run "${PIP[@]}" "torch==$TORCH_VERSION"
else
  say "torch: CPU build, asking $CPU_INDEX (no NVIDIA GPU found): the tensor library the models run on"
  # pip also looks in any find-links / extra index of its configuration.
  if ! run "${PIP[@]}" --timeout 10 --retries 0 --index-url "$CPU_INDEX" "torch==$TORCH_VERSION"; then
    say "torch: $CPU_INDEX cannot be reached; torch==$TORCH_VERSION from the default index instead (where that is PyPI, the CUDA build: several GB)"
    run "${PIP[@]}" "torch==$TORCH_VERSION"
  fi
fi

if [ "$DRY" = 0 ] && ! have_torch; then
  say "torch: the install failed; install torch==$TORCH_VERSION for your machine (pytorch.org), then run this again" >&2
  exit 1
fi
if [ "$DRY" = 0 ]; then
  say "torch: got $("$PY" -W ignore -c 'import torch; print(torch.__version__, "(CUDA " + str(torch.version.cuda) + ")" if torch.version.cuda else "(CPU)")')"
fi

# --- diffstream ---------------------------------------------------------------------
if [ "$DEV" = 1 ]; then
  say "diffstream[dev]: editable, runtime + server + test tools (pytest, httpx, playwright, ray, matplotlib)"
  run "${PIP[@]}" -e ".[dev]"
else
  say "diffstream[server]: editable, runtime (diffusers, transformers, PyAV, OpenCV, ...) + fastapi/uvicorn/websockets for diffstream serve"
  run "${PIP[@]}" -e ".[server]"
fi

# --- the browser test's Chromium (--dev only) ------------------------------------------
# The browser test drives Debian's Chromium with Playwright (never `playwright install`,
# which downloads a browser). Without root or apt the test skips and says why.
if [ "$DEV" = 1 ] && [ "${DIFFSTREAM_SKIP_BROWSER:-0}" != "1" ]; then
  if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
    say "chromium: already installed (the browser test uses it)"
  elif [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    say "chromium: Debian's package, for the browser test (headless)"
    if [ "$DRY" = 1 ]; then
      run apt-get install -y -qq --no-install-recommends chromium
    else
      (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium) >/dev/null 2>&1 \
        || say "chromium: could not install it; the browser test will be skipped" >&2
    fi
  else
    say "chromium: not installed (needs root and apt-get); the browser test will be skipped"
  fi
fi

if [ "$DRY" = 0 ]; then
  BIN=$(dirname "$PY")
  say "done: $BIN/diffstream --help  (tests: $BIN/python -m pytest -q)"
fi
