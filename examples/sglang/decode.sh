#!/usr/bin/env bash
# Decode instance: receives the KV that prefill pushes. Each TP rank r listens for transfers on
# PRFAAS_SGLANG_LISTEN_PORT + r (control, gRPC) and PRFAAS_SGLANG_DATA_PORT + r (bulk TCP);
# open both ranges to the prefill hosts.
set -euo pipefail
MODEL=${MODEL:-Qwen/Qwen3-Next-80B-A3B-Instruct}
HOST_IP=${HOST_IP:?set HOST_IP to this host\'s address that prefill hosts can reach}
export SGLANG_HOST_IP=$HOST_IP
export PRFAAS_SGLANG_LISTEN_PORT=${PRFAAS_SGLANG_LISTEN_PORT:-15600}
export PRFAAS_SGLANG_DATA_PORT=${PRFAAS_SGLANG_DATA_PORT:-15700}
export PRFAAS_SGLANG_ADVERTISE_HOST=${PRFAAS_SGLANG_ADVERTISE_HOST:-$HOST_IP}
exec python -m sglang.launch_server \
  --model-path "$MODEL" --tp-size "${TP:-4}" \
  --host 0.0.0.0 --port 30001 \
  --disaggregation-mode decode \
  --disaggregation-transfer-backend prfaas
