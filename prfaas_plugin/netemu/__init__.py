"""Emulated cross-datacenter links on one machine.

Two network namespaces joined by tun devices and a user-space delay line, with a ``tbf`` rate
limit on each side. The kernel here has no ``netem``; a delay line that holds every IP packet
(ACKs included) reproduces the bandwidth-delay-product effects that matter for KV streaming
(window caps of single TCP flows), which an application-level token bucket would not.
"""

from prfaas_plugin.netemu.link import EmulatedLink, LinkSpec, cleanup_stale_namespaces, netns_unavailable_reason

__all__ = ["EmulatedLink", "LinkSpec", "cleanup_stale_namespaces", "netns_unavailable_reason"]
