#!/usr/bin/env bash
# SGLang's own PD router in front of one prefill and one decode instance. It injects
# bootstrap_host/bootstrap_port/bootstrap_room into both requests; nothing prfaas-specific.
set -euo pipefail
PREFILL=${PREFILL:-http://10.0.1.10:30000}
DECODE=${DECODE:-http://10.0.2.20:30001}
exec python -m sglang_router.launch_router --pd-disaggregation \
  --prefill "$PREFILL" 8998 \
  --decode "$DECODE" \
  --host 0.0.0.0 --port 8000 "$@"     # add --mini-lb for the Python debugging balancer
