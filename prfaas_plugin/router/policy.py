"""The routing rule (paper section 3.4.3) as a pure function of the request and the fleet.

l = l_total - l_prefix; l > t goes to the PrfaaS cluster, otherwise it stays local.
- bandwidth scarce: each cluster's cache is judged on its own: l_prefix is the *local* cluster's
  prefix (a prefix cached only on the PrfaaS side does not make a request cheap to keep local);
- bandwidth abundant: l_prefix is the longest prefix anywhere.
Inside a cluster the instance holding the prefix wins, then the least loaded one (``Instance.load``:
the engine's own queue where it is read, so several router replicas pick alike).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from prfaas_plugin.fleet.prefix_index import PrefixIndex
from prfaas_plugin.router.instances import Fleet, Instance

Route = Literal["prfaas", "local"]


@dataclass(frozen=True)
class Decision:
    route: Route
    prefill: Instance | None  # None: ``decode`` prefills too (a "both" instance, no transfer)
    decode: Instance
    l_total: int
    l_prefix: int
    l_uncached: int
    threshold: float
    bandwidth_mode: str
    reason: str


class NoInstance(RuntimeError):
    """No healthy instance can serve the request (answered as HTTP 503)."""


def _pick(cands: Sequence[Instance], holder: str | None) -> Instance:
    for c in cands:
        if c.url == holder:
            return c
    return min(cands, key=lambda i: (i.load, i.url))


def decide(
    tokens: Sequence[int],
    fleet: Fleet,
    index: PrefixIndex,
    threshold: float,
    bandwidth_mode: str,
    exclude_prfaas: bool = False,
) -> Decision:
    l_total = len(tokens)
    locals_ = [i for i in fleet.of_kind("local") if i.routable]
    decoders = [i for i in locals_ if i.can_decode]
    if not decoders:
        raise NoInstance("no healthy local instance can decode")
    local_prefillers = [i for i in locals_ if i.can_prefill]
    remote = [] if exclude_prfaas else [i for i in fleet.of_kind("prfaas") if i.routable and i.can_prefill]

    l_local, local_holder = index.longest_prefix(tokens, [i.url for i in local_prefillers])
    l_remote, remote_holder = index.longest_prefix(tokens, [i.url for i in remote]) if remote else (0, None)
    l_prefix = max(l_local, l_remote) if bandwidth_mode == "abundant" else l_local
    l_uncached = l_total - l_prefix

    if l_uncached > threshold and remote:
        reason = "uncached length above threshold"
        prefill = _pick(remote, remote_holder)
        decode = min(decoders, key=lambda i: (i.load, i.url))
        return Decision("prfaas", prefill, decode, l_total, l_prefix, l_uncached, threshold, bandwidth_mode, reason)
    if l_uncached > threshold:
        reason = "prfaas unavailable"
    elif l_prefix > l_local:
        reason = "prefix cached elsewhere; bandwidth abundant"
    else:
        reason = "uncached length within threshold" if l_prefix == 0 else "local prefix hit"
    if not local_prefillers:
        raise NoInstance("no healthy local instance can prefill")
    prefill = _pick(local_prefillers, local_holder)
    if prefill.can_decode:
        return Decision("local", None, prefill, l_total, l_prefix, l_uncached, threshold, bandwidth_mode, reason)
    decode = min(decoders, key=lambda i: (i.load, i.url))
    return Decision("local", prefill, decode, l_total, l_prefix, l_uncached, threshold, bandwidth_mode, reason)


def prfaas_overloaded(remote: Sequence[Instance], queue_high: int) -> bool:
    """True when every routable PrfaaS instance has ``queue_high`` or more requests open: the
    request then stays local even above t (the short-term loop raises t meanwhile)."""
    routable = [i for i in remote if i.routable]
    return bool(routable) and all(i.load >= queue_high for i in routable)


def bandwidth_mode(configured: str, utilisation: float, egress_low: float) -> str:
    """``configured`` unless it is ``auto``: then abundant while the link is used below half
    its low mark, scarce otherwise."""
    if configured != "auto":
        return configured
    return "abundant" if utilisation < egress_low / 2 else "scarce"
