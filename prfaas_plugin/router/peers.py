"""Sharing the one input of t that router replicas do not see alike: the uncached lengths.

Behind a Service each replica routes a share of the traffic. The egress (the producers' own
counters) and the PrfaaS queue (the engines' own gauges, router/engine_load.py) are the same
for every replica, but the lengths that the planner re-optimises t* on are each replica's own
requests. Each share is a random sample of the same traffic, so the replicas' t* estimates
converge as their windows grow -- slowly: the planner's optimum sits on a flat throughput
curve, so small differences between two samples of one workload move it far (docs/router-replicas.md
gives an example). So each replica reads its peers' windows (``GET /admin/lengths``) every
``replicas.peers_every_s`` and re-optimises on the union, which every replica then shares: the
same samples give the same t*.

No shared store: this is a read-only sample with no consistency to keep. A peer that cannot be
read keeps its last copy for three rounds and is then dropped (its requests simply stop
counting); a replica that starts late catches up at its first round. Peers come from a list of
URLs and/or a DNS name with one address per replica (a Kubernetes headless Service); each
replica carries a random id so it can skip itself among them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time

from prfaas_plugin.router.config import ReplicaSpec
from prfaas_plugin.router.threshold import ThresholdController
from prfaas_plugin.router.upstream import Upstream, UpstreamError

log = logging.getLogger("prfaas.router")


def new_replica_id() -> str:
    """A replica's id among its peers (``/admin/lengths`` reports it)."""
    return os.urandom(8).hex()


async def peer_urls(spec: ReplicaSpec) -> list[str]:
    urls = list(spec.peers)
    if spec.peers_dns:
        host, _, port = spec.peers_dns.rpartition(":")
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("replicas.peers_dns %s does not resolve: %s", spec.peers_dns, exc)
            infos = []
        for info in infos:
            addr = str(info[4][0])
            urls.append(f"http://[{addr}]:{port}" if ":" in addr else f"http://{addr}:{port}")
    return sorted(set(urls))


async def read_peers(client: Upstream, spec: ReplicaSpec, controller: ThresholdController, self_id: str) -> int:
    """One round: read every peer's window into ``controller.peer_lengths``; returns how many
    peers answered."""
    now = time.monotonic()
    answered = 0
    for url in await peer_urls(spec):
        try:
            status, text = await client.get_text(f"{url}/admin/lengths", spec.peers_every_s)
            parsed = json.loads(text) if status == 200 else None
        except (UpstreamError, ValueError):
            continue
        if status != 200 or not isinstance(parsed, dict) or parsed.get("replica") == self_id:
            continue
        lengths = parsed.get("lengths")
        if not isinstance(lengths, list) or not all(isinstance(x, int) and x >= 0 for x in lengths):
            log.warning("peer %s sent unusable lengths; ignored", url)
            continue
        controller.peer_lengths[str(parsed.get("replica"))] = (lengths, now)
        answered += 1
    for rid, (_, at) in list(controller.peer_lengths.items()):
        if now - at > 3 * spec.peers_every_s:
            del controller.peer_lengths[rid]
    return answered


async def peers_loop(client: Upstream, spec: ReplicaSpec, controller: ThresholdController, self_id: str) -> None:
    while True:
        await read_peers(client, spec, controller, self_id)
        await asyncio.sleep(spec.peers_every_s)
