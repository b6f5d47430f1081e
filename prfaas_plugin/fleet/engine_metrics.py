"""Reading an engine's Prometheus text: its queue (running + waiting requests, vLLM's or SGLang's
gauges) and any counter summed over its label sets. The names live in ``protocol/metrics.py``."""

from __future__ import annotations

from prfaas_plugin.protocol import metrics as M


def counter_total(text: str, name: str) -> float | None:
    """The sum of a counter's samples over all its label sets in a Prometheus text exposition,
    or None if it has none. A line scan, not a full parser: an engine's /metrics runs to tens
    of KB of histograms, and this runs on the router's event loop."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        rest = line[len(name) :]
        if rest.startswith("{"):
            rest = rest[rest.rfind("}") + 1 :]
        elif not rest[:1].isspace():
            continue  # another metric whose name starts the same way
        try:
            total += float(rest.split()[0])
            found = True
        except (ValueError, IndexError):
            continue
    return total if found else None


#: (running, waiting) sample names per engine as they appear on /metrics, vLLM first.
QUEUE_GAUGES = tuple((r.exposed, w.exposed) for r, w in M.ENGINE_QUEUE)


def engine_queue(text: str) -> int | None:
    """Running + waiting requests from an engine's /metrics text (summed over label sets, e.g.
    one per data-parallel engine), or None if it exports neither engine's gauges."""
    for running, waiting in QUEUE_GAUGES:
        r, w = counter_total(text, running), counter_total(text, waiting)
        if r is not None or w is not None:
            return int((r or 0) + (w or 0))
    return None
