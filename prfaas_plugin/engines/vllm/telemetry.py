"""Prometheus metrics of the connector (in the worker process's default registry)."""

from prometheus_client import Counter

LOAD_FAILURES = Counter("prfaas_vllm_kv_load_failures", "KV loads that failed; decode recomputed", ["error"])
TRANSFER_BYTES = Counter("prfaas_vllm_kv_received_bytes", "KV bytes received by consumers")
