"""What the router remembers of each request (``/admin/requests``, the demo's report)."""

from __future__ import annotations

import collections
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass
class Record:
    """What the router knows of one request."""

    request_id: str
    endpoint: str
    route: str
    reason: str
    l_total: int
    l_prefix: int
    l_uncached: int
    threshold: float
    prefill_instance: str | None
    decode_instance: str
    started_at: float
    stream: bool
    kv_bytes: int = 0
    #: Egress estimated for a producer that reported no bytes (``Flow.estimated_kv_bytes``).
    kv_bytes_estimated: int = 0
    transfer_id: str | None = None
    transfer_status: str | None = None
    fallback: str | None = None
    queue_s: float = 0.0
    prefill_s: float | None = None
    ttft_s: float | None = None
    total_s: float | None = None
    #: The router's own share of ``ttft_s`` (``Flow.overhead``); None if it fell back or was re-placed.
    overhead_s: float | None = None
    #: Instances found unreachable at dispatch before this one took the request.
    rerouted: int = 0
    status: int | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class RecordBook(Mapping[str, Record]):
    """The last ``capacity`` records by request id (a read-only mapping), oldest dropped first."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._records: collections.OrderedDict[str, Record] = collections.OrderedDict()

    def add(self, rec: Record) -> None:
        self._records[rec.request_id] = rec
        while len(self._records) > self.capacity:
            self._records.popitem(last=False)

    def __getitem__(self, request_id: str) -> Record:
        return self._records[request_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def __reversed__(self) -> Iterator[str]:
        return reversed(self._records)

    def last(self, n: int) -> list[Record]:
        return list(self._records.values())[-max(1, min(n, self.capacity)) :]

    def __len__(self) -> int:
        return len(self._records)


class RecentShare:
    """The share of the last ``n`` values equal to ``value``, kept as a running count (the offload
    fraction gauge; recounting the window would cost a loop over it per request)."""

    def __init__(self, n: int, value: str) -> None:
        self.window: collections.deque[str] = collections.deque(maxlen=n)
        self.value = value
        self.count = 0

    def add(self, item: str) -> float:
        w = self.window
        if len(w) == w.maxlen and w[0] == self.value:
            self.count -= 1
        w.append(item)
        self.count += item == self.value
        return self.count / len(w)
