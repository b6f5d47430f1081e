"""The prefill side's count of KV bytes its receivers confirmed, on SGLang's own ``/metrics``.

Why: the router's bandwidth loop reads what crossed the link from each PrfaaS producer
(router/egress.py). vLLM producers export ``vllm:prfaas_kv_sent_bytes_total``; SGLang's
prefill answers carry no byte count, so without this counter the router could only estimate
SGLang egress from prompt lengths. With ``--enable-metrics`` SGLang runs prometheus_client in
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` is set before its scheduler processes start,
and its HTTP server serves every process's values through ``MultiProcessCollector``), so a
counter created here, in a scheduler process, appears there summed over tensor-parallel ranks.
Without ``--enable-metrics`` it stays in memory and costs nothing.
"""

from __future__ import annotations

import threading
from typing import Any

from prfaas_plugin.protocol.metrics import (
    SGLANG_KV_SENT_BYTES,
    SGLANG_STAGING_POOL_CAPACITY,
    SGLANG_STAGING_POOL_IN_USE,
)

_lock = threading.Lock()
_counter: Any | None = None


def sent_bytes_counter() -> Any:
    """The process's counter, made on first use: prometheus_client decides at import whether
    values go to the multiprocess directory, so it must not be imported before SGLang set it.
    Not registered anywhere: in multiprocess mode the collector reads the files, and several
    managers in one process (tests, a role switch) share the one counter."""
    global _counter
    with _lock:
        if _counter is None:
            from prometheus_client import Counter

            _counter = Counter(SGLANG_KV_SENT_BYTES.name, SGLANG_KV_SENT_BYTES.help, registry=None)
        return _counter


def record_sent(nbytes: int) -> None:
    if nbytes > 0:
        sent_bytes_counter().inc(nbytes)


def counted_bytes() -> float:
    """This process's count (the tests read it; /metrics reads the counter itself)."""
    for metric in sent_bytes_counter().collect():
        for sample in metric.samples:
            if sample.name == SGLANG_KV_SENT_BYTES.exposed:
                return float(sample.value)
    return 0.0


_pool_gauges: tuple[Any, Any] | None = None


def record_staging_pool(capacity: int, in_use: int) -> None:
    """The pinned staging pool of this process's GPU (engines/sglang/memory.py ``CudaSpace``):
    its size and what transfers in flight hold. Summed over the scheduler processes on /metrics."""
    global _pool_gauges
    with _lock:
        if _pool_gauges is None:
            from prometheus_client import Gauge

            _pool_gauges = tuple(  # type: ignore[assignment]
                Gauge(s.name, s.help, registry=None, multiprocess_mode="livesum")
                for s in (SGLANG_STAGING_POOL_CAPACITY, SGLANG_STAGING_POOL_IN_USE)
            )
        gauges = _pool_gauges
    assert gauges is not None
    gauges[0].set(capacity)
    gauges[1].set(in_use)
