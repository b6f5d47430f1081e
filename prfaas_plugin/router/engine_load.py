"""Instance load that every router replica agrees on: the engines' own queue gauges.

One router counts only the requests it opened itself (``Instance.inflight``). Behind a Service,
two or more replicas each see a share of the traffic, so each would call a different instance
the least loaded and they would pile work onto the instances the others already filled. The
engines know their whole queue: vLLM exports ``vllm:num_requests_running`` and
``vllm:num_requests_waiting``, SGLang ``sglang:num_running_reqs`` and ``sglang:num_queue_reqs``
(with ``--enable-metrics``). Every ``replicas.load_scrape_s`` each replica reads them from every
instance; between readings it adds what it opened there since (and has not closed yet), and it
never counts fewer than its own open requests. A reading older than ``replicas.load_stale_s``
(an instance that stopped answering /metrics) is dropped and the instance counts its own open
requests alone, as a single router does. The PrfaaS queue that drives the short-term threshold
loop is the sum of the same loads over the PrfaaS instances, so replicas raise and relax t on
the same input.
"""

from __future__ import annotations

import logging
import time

from prfaas_plugin.fleet.engine_metrics import engine_queue
from prfaas_plugin.router.instances import Instance
from prfaas_plugin.router.upstream import Upstream, UpstreamError

log = logging.getLogger("prfaas.router")


async def read_load(client: Upstream, inst: Instance, timeout_s: float, now: float | None = None) -> bool:
    """Read ``inst``'s queue gauges into it; False when it could not be read (the previous
    reading stands until it goes stale)."""
    try:
        status, text = await client.get_text(f"{inst.url}/metrics", timeout_s)
    except UpstreamError:
        return False
    value = engine_queue(text) if status == 200 else None
    if value is None:
        if inst.reported is not None:
            log.warning("instance %s no longer exposes its queue gauges; counting this replica's requests", inst.url)
        inst.reported = None
        return False
    inst.set_reported(value, time.monotonic() if now is None else now)
    return True
