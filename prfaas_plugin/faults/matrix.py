"""The transfer engine under injected faults: every request must either land bit-exact or fail
with a typed error within its deadline, and nothing may leak or hang.

Used by the CI test (tests/test_reliability_transfer.py) and by bench/reliability.py, which
prints the report table. Each case puts a ``FaultProxy`` on the data plane (the receiver
advertises the proxy), runs a batch of concurrent requests while the fault is active, then
clears it and checks that a fresh request succeeds (the engine recovers without a restart).
"""

from __future__ import annotations

import dataclasses
import gc
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from prfaas_plugin.faults.proxy import FaultKind, FaultPlan, FaultProxy
from prfaas_plugin.transfer import (
    GrpcTcpReceiver,
    GrpcTcpSender,
    ItemSpec,
    LayoutFingerprint,
    ReceiverConfig,
    SenderConfig,
    TransferError,
    TransferManifest,
)
from prfaas_plugin.transfer.config import split_hostport

FINGERPRINT = LayoutFingerprint({"model": "fault-matrix", "dtype": "bfloat16", "block_size": 16})


@dataclass(frozen=True)
class FaultCase:
    name: str
    plan: FaultPlan
    deadline_s: float
    #: Outcomes allowed while the fault is active ("ok" and/or "failed").
    allowed: frozenset[str]


@dataclass
class CaseResult:
    case: str
    injected: int = 0
    survived: int = 0  # landed bit-exact
    failed_cleanly: int = 0  # typed TransferError on both sides within the deadline
    wrong_data: int = 0
    hung: int = 0
    untyped_errors: list[str] = field(default_factory=list)
    error_types: dict[str, int] = field(default_factory=dict)
    #: Slowest time from opening a request to both sides resolved (seconds).
    max_resolve_s: float = 0.0
    recovered: bool = False
    leaks: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return self.wrong_data == 0 and self.hung == 0 and not self.untyped_errors and not self.leaks and self.recovered


def default_cases(request_bytes: int) -> list[FaultCase]:
    half = request_bytes // 2
    return [
        FaultCase("reset mid-stream", FaultPlan(FaultKind.RESET, after_bytes=half), 8.0, frozenset({"ok", "failed"})),
        FaultCase("blackhole stall", FaultPlan(FaultKind.BLACKHOLE, after_bytes=half), 3.0, frozenset({"failed"})),
        FaultCase(
            "bandwidth collapse to 1%",
            FaultPlan(FaultKind.THROTTLE, rate_bytes_per_s=request_bytes / 100.0),
            3.0,
            frozenset({"failed"}),
        ),
        FaultCase(
            "corrupted bytes",
            FaultPlan(FaultKind.CORRUPT, corrupt_every=request_bytes // 3 + 1),
            8.0,
            frozenset({"ok", "failed"}),
        ),
    ]


def _fds() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


def run_case(
    case: FaultCase,
    requests: int = 4,
    request_bytes: int = 2 << 20,
    items_per_request: int = 4,
    connections: int = 2,
    log: Callable[[str], None] = lambda _m: None,
    receiver: ReceiverConfig | None = None,
    sender: SenderConfig | None = None,
) -> CaseResult:
    """``receiver``/``sender``: the engines' configs (e.g. a checksum choice, TLS); the receiver
    is made to advertise the proxy, the sender's ``connections`` is overridden."""
    res = CaseResult(case.name)
    rng = np.random.default_rng(abs(hash(case.name)) % 2**32)
    item_bytes = request_bytes // items_per_request
    items = tuple(ItemSpec(f"L{i}", item_bytes, order=i) for i in range(items_per_request))
    payloads = [
        {it.name: rng.integers(0, 256, item_bytes, dtype=np.uint8) for it in items} for _ in range(requests + 1)
    ]

    gc.collect()
    fds0, threads0 = _fds(), threading.active_count()  # before any engine exists: close() must undo it all
    proxy = FaultProxy(("127.0.0.1", 1))  # upstream set once the receiver is bound
    proxy.start()
    rx = GrpcTcpReceiver(dataclasses.replace(receiver or ReceiverConfig(), advertise_data=proxy.endpoint))
    proxy.upstream = split_hostport(rx.bound_data_endpoint or "")
    tx = GrpcTcpSender(dataclasses.replace(sender or SenderConfig(chunk_bytes=256 << 10), connections=connections))
    t0 = time.monotonic()
    try:
        proxy.set_fault(case.plan)
        res.injected = requests
        opened = time.monotonic()
        live = [_start(rx, tx, f"{case.name}-{r}", items, payloads[r], case.deadline_s) for r in range(requests)]
        for (rid, sinks, rh, sh), payload in zip(live, payloads):
            outcome = _outcome(rh, sh, sinks, payload, case.deadline_s, res)
            res.max_resolve_s = max(res.max_resolve_s, time.monotonic() - opened)
            log(f"{case.name}: {rid} -> {outcome}")
            if outcome == "ok":
                res.survived += 1
            elif outcome == "failed":
                res.failed_cleanly += 1
            elif outcome == "hung":
                res.hung += 1
            elif outcome == "wrong":
                res.wrong_data += 1
            if outcome in ("ok", "failed") and outcome not in case.allowed:
                res.untyped_errors.append(f"{rid}: outcome {outcome!r} not expected under {case.name}")
        # Clear the fault: a new request must go through on the same engines.
        proxy.set_fault(FaultPlan())
        rid, sinks, rh, sh = _start(rx, tx, f"{case.name}-after", items, payloads[-1], 20.0)
        res.recovered = _outcome(rh, sh, sinks, payloads[-1], 20.0, res) == "ok"
        # Leaks: no session or request left, buffers dropped, threads and fds back near start.
        _settle(lambda: tx.stats()["requests_active"] == 0 and rx.stats()["sessions_active"] == 0)
        if tx.stats()["requests_active"]:
            res.leaks.append(f"sender still tracks {tx.stats()['requests_active']} requests")
        if rx.stats()["sessions_active"]:
            res.leaks.append(f"receiver still tracks {rx.stats()['sessions_active']} sessions")
    finally:
        tx.close()
        rx.close()
        proxy.stop()
    del live
    gc.collect()
    _settle(lambda: threading.active_count() <= threads0 + 2 and _fds() <= fds0 + 2, timeout_s=10.0)
    if threading.active_count() > threads0 + 2:
        res.leaks.append(f"threads {threads0} -> {threading.active_count()}")
    if _fds() > fds0 + 2:
        res.leaks.append(f"file descriptors {fds0} -> {_fds()}")
    res.seconds = time.monotonic() - t0
    return res


class _Sink:
    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def buffer_for(self, item: ItemSpec) -> memoryview:
        arr = np.empty(item.nbytes, dtype=np.uint8)
        self.arrays[item.name] = arr
        return memoryview(arr.data)

    def item_done(self, item: ItemSpec) -> None:
        pass


def _start(rx, tx, rid, items, payload, deadline_s):
    tok = secrets.token_urlsafe(24)
    sink = _Sink()
    rh = rx.expect(rid, tok, FINGERPRINT, sink, deadline_s=deadline_s)
    sh = tx.open(rx.endpoint, TransferManifest(rid, items, FINGERPRINT, sender_id="matrix"), tok, deadline_s=deadline_s)
    for name, arr in payload.items():
        sh.send(name, arr)
    return rid, sink, rh, sh


def _outcome(rh, sh, sink, payload, deadline_s, res: CaseResult) -> str:
    errors = []
    grace = deadline_s + 5.0  # the engine must resolve both futures by its own deadline
    for fut in (sh.done, rh.done):
        try:
            fut.result(timeout=grace)
        except TimeoutError:
            return "hung"
        except TransferError as exc:
            errors.append(type(exc).__name__)
        except Exception as exc:  # an untyped error is a bug the caller cannot act on
            res.untyped_errors.append(f"{type(exc).__name__}: {exc}")
            return "untyped"
    for e in errors:
        res.error_types[e] = res.error_types.get(e, 0) + 1
    if errors:
        return "failed"
    if all(np.array_equal(sink.arrays[k], v) for k, v in payload.items()):
        return "ok"
    return "wrong"


def until(pred: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> bool:
    """Poll ``pred`` until it holds (True) or ``timeout_s`` passes (False): the fault checks wait
    for releases and recoveries that happen on other threads or processes."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True


def _settle(pred: Callable[[], bool], timeout_s: float = 5.0) -> None:
    until(pred, timeout_s)
