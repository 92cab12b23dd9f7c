#!/usr/bin/env bash
# Run every benchmark on an otherwise idle machine; JSON results go to docs/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p docs/results
export RAY_AUTH_MODE=disabled
.venv/bin/python bench/capture_throughput.py --rounds 3 --out docs/results/capture.json
.venv/bin/python bench/capture_throughput.py --paired 30 --out docs/results/capture-paired.json \
    --modes "plain vLLM, a second engine (control)|ids + weights + logits|ids + weights + logits -> Zarr store, commit blocking"
.venv/bin/python bench/topk_order.py --out docs/results/topk-order.json
.venv/bin/python bench/expert_load.py --out docs/results/expert-load.json
.venv/bin/python bench/slot_rows.py --out docs/results/slot-rows.json
.venv/bin/python bench/store_throughput.py --rows 20000 --out docs/results/store.json
.venv/bin/python bench/analyzer_throughput.py --out docs/results/analyzer.json
.venv/bin/python bench/service_throughput.py --rounds 2 --repeats 5 --out docs/results/service.json
.venv/bin/python bench/service_throughput.py --jobs-only --rounds 2 --repeats 8 --out docs/results/small-jobs.json
.venv/bin/python bench/prefix_caching.py --rounds 3 --out docs/results/prefix.json
