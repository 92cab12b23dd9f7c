#!/usr/bin/env bash
# Set up (if needed) and run the end-to-end demo on a tiny built-in MoE model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m capture_server.demo "$@"
