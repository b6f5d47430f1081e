"""PrfaaS egress from the transfer engines' own counters.

The short-term threshold loop needs the bytes that really crossed the link. A producer's answer
only carries the layout's prediction for the whole prompt (``kv_transfer_params.bytes``), which
over-counts whenever the decode side already held a prefix (only the uncached part crosses) and
comes before the transfer finished. The prfaas vLLM connector counts what its receivers
confirmed in ``vllm:prfaas_kv_sent_bytes_total`` on each producer's ``/metrics`` (the SGLang
backend in ``sglang:prfaas_kv_sent_bytes_total`` when SGLang runs with ``--enable-metrics``); the router
reads that counter every ``threshold.egress_scrape_s`` and feeds the increments to the
controller. Producers without the counter (other connectors) keep the reported bytes; those that
report none either (SGLang without ``--enable-metrics``) are estimated from the prompt beyond the
prefix their decode instance holds (``threshold.kv_bytes_per_token``, else the planner's PrfaaS
profile).
"""

from __future__ import annotations

from prfaas_plugin.fleet.engine_metrics import counter_total
from prfaas_plugin.protocol import metrics as M

#: The producers' confirmed-bytes counters as they appear on /metrics (vLLM first).
SENT_BYTES = tuple(m.exposed for m in M.SENT_BYTES)


def sent_bytes_total(text: str) -> float | None:
    """The producer's confirmed-bytes counter, whichever engine exported it (None: neither)."""
    for name in SENT_BYTES:
        value = counter_total(text, name)
        if value is not None:
            return value
    return None


class EgressMeter:
    """The last counter value per producer, turned into increments (a restarted producer's
    counter starts again from zero: its new value is the increment)."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def measured(self, url: str) -> bool:
        return url in self.last

    def update(self, url: str, value: float) -> int:
        prev = self.last.get(url)
        self.last[url] = value
        if prev is None:
            return 0  # the first reading is a baseline: what crossed before is not this window's
        return int(value - prev) if value >= prev else int(value)

    def forget(self, url: str) -> None:
        self.last.pop(url, None)
