#!/usr/bin/env bash
# PrfaaS prefill instance (the "remote prefill" cluster): SGLang in prefill mode, KV pushed to
# decode over the prfaas transfer engine. Needs: pip install prfaas-plugin sglang==0.5.23
set -euo pipefail
MODEL=${MODEL:-Qwen/Qwen3-Next-80B-A3B-Instruct}
HOST_IP=${HOST_IP:?set HOST_IP to this host\'s address that decode hosts can reach}
export SGLANG_HOST_IP=$HOST_IP                 # the ZMQ control address decode ranks dial
export PRFAAS_SGLANG_CONNECTIONS=${PRFAAS_SGLANG_CONNECTIONS:-4}   # TCP streams per decode peer
# export PRFAAS_SGLANG_PACING_GBPS=40         # hold this rank's egress under a share of the link
exec python -m sglang.launch_server \
  --model-path "$MODEL" --tp-size "${TP:-4}" \
  --host 0.0.0.0 --port 30000 \
  --disaggregation-mode prefill \
  --disaggregation-transfer-backend prfaas \
  --disaggregation-bootstrap-port 8998 \
  --enable-metrics                             # /metrics: sglang:prfaas_kv_sent_bytes_total for the router
