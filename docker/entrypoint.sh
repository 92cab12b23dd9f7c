#!/usr/bin/env bash
# One entrypoint for the GPU and CPU images: the role is the first argument.
#
#   entrypoint.sh serve ...    capture server (settings from MOETRACE_* variables; further
#                              arguments are `moetrace serve` flags, vLLM engine flags included)
#   entrypoint.sh ray-head     Ray head for the analyzer (dashboard and job API on 8265)
#   entrypoint.sh ray-worker   Ray worker joining RAY_HEAD_ADDRESS
#   entrypoint.sh analyze ...  python -m analyzer run ... (on the local Ray or RAY_ADDRESS)
#   entrypoint.sh ANY COMMAND  runs it as is (a shell, the CLI, ...)
#
# Environment:
#   MOETRACE_DEVICE        cpu | gpu (the image sets it). On cpu the vLLM CPU settings
#                          below get defaults unless already set, and engines run float32.
#   MOETRACE_MODELS        checkpoint directories, comma-separated
#   MOETRACE_SPECIMEN      with no MOETRACE_MODELS: build this tiny built-in model
#                          (qwen3_moe, mixtral, ...) under the data dir and serve it
#   MOETRACE_DATA_DIR      jobs and stores (default /data)
#   MOETRACE_HOST / MOETRACE_PORT   listen address (default 0.0.0.0:8000)
#   MOETRACE_ENGINE        vLLM engine settings as JSON, e.g. '{"tensor_parallel_size": 2}'
#   MOETRACE_HIDDEN_LAYERS, MOETRACE_TOKEN, ...
#                          any other service setting (see capture_server/api/config.py)
#   VLLM_CPU_KVCACHE_SPACE (GiB, cpu), VLLM_CPU_OMP_THREADS_BIND (cpu)
#   RAY_HEAD_ADDRESS       host:port of the Ray head (ray-worker)
#   PYTHON                 interpreter (default: python on PATH)
set -euo pipefail

PYTHON=${PYTHON:-python}
role=${1:-serve}
[ $# -gt 0 ] && shift

export MOETRACE_DATA_DIR=${MOETRACE_DATA_DIR:-/data}
export MOETRACE_HOST=${MOETRACE_HOST:-0.0.0.0}
export MOETRACE_PORT=${MOETRACE_PORT:-8000}
if [ "${MOETRACE_DEVICE:-gpu}" = cpu ]; then
  export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4}
  export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-nobind}
  export MOETRACE_ENGINE=${MOETRACE_ENGINE:-'{"dtype": "float32"}'}
fi

case "$role" in
  serve)
    if [ -z "${MOETRACE_MODELS:-}" ]; then
      if [ -z "${MOETRACE_SPECIMEN:-}" ]; then
        echo "entrypoint: set MOETRACE_MODELS (checkpoint dirs) or MOETRACE_SPECIMEN" >&2
        exit 2
      fi
      model="$MOETRACE_DATA_DIR/models/$MOETRACE_SPECIMEN"
      [ -f "$model/config.json" ] || "$PYTHON" -m capture_server.specimens "$MOETRACE_SPECIMEN" "$model"
      export MOETRACE_MODELS="$model"
    fi
    exec "$PYTHON" -m capture_server.api serve "$@"
    ;;
  ray-head)
    exec ray start --head --block --port="${RAY_PORT:-6379}" \
      --dashboard-host="${RAY_DASHBOARD_HOST:-0.0.0.0}" --dashboard-port=8265 "$@"
    ;;
  ray-worker)
    : "${RAY_HEAD_ADDRESS:?set RAY_HEAD_ADDRESS to host:port of the Ray head}"
    exec ray start --block --address="$RAY_HEAD_ADDRESS" "$@"
    ;;
  analyze)
    exec "$PYTHON" -m analyzer run "$@"
    ;;
  *)
    exec "$role" "$@"
    ;;
esac
