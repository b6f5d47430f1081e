"""A TCP proxy with programmable faults, placed between a prefill sender and a decode receiver.

Faults apply to the client -> upstream direction (the direction KV bytes flow when the prefill
side dials the decode side) once ``after_bytes`` have passed on a connection, and can be changed
while connections are open, e.g. "let 1 MiB through, then reset every connection":

- RESET: abort both sockets with an RST (SO_LINGER 0), as a crashed middlebox or peer would.
- BLACKHOLE: stop forwarding but keep the connections open (a silent stall).
- THROTTLE: forward at ``rate_bytes_per_s`` (bandwidth collapse).
- CORRUPT: flip one bit every ``corrupt_every`` bytes (what a checksum must catch).

It runs its own asyncio loop in a daemon thread so synchronous tests can drive it.
"""

from __future__ import annotations

import asyncio
import enum
import socket
import struct
import threading
from dataclasses import dataclass, field


class FaultKind(enum.Enum):
    NONE = "none"
    RESET = "reset"
    BLACKHOLE = "blackhole"
    THROTTLE = "throttle"
    CORRUPT = "corrupt"


@dataclass(frozen=True)
class FaultPlan:
    kind: FaultKind = FaultKind.NONE
    after_bytes: int = 0
    rate_bytes_per_s: float = 0.0
    corrupt_every: int = 1 << 20
    #: False: ``after_bytes`` counts every connection's bytes together from the moment the plan
    #: is set, so connections opened later (a sender reconnecting) are faulty from their first
    #: byte once the budget is spent -- "the path dies N bytes into this transfer".
    per_connection: bool = True
    #: RESET only: when the budget is spent, reset *every* open connection once and heal (a
    #: middlebox restarting): what a sender must survive by reconnecting and resending.
    once: bool = False

    def __post_init__(self) -> None:
        if self.after_bytes < 0:
            raise ValueError("after_bytes must be >= 0")
        if self.kind is FaultKind.THROTTLE and self.rate_bytes_per_s <= 0:
            raise ValueError("THROTTLE needs rate_bytes_per_s > 0")
        if self.kind is FaultKind.CORRUPT and self.corrupt_every <= 0:
            raise ValueError("CORRUPT needs corrupt_every > 0")


@dataclass
class ProxyStats:
    connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    resets: int = 0
    corrupted_bytes: int = 0
    open_connections: int = 0
    by_connection: list[int] = field(default_factory=list)


_CHUNK = 256 * 1024


class FaultProxy:
    def __init__(self, upstream: tuple[str, int], listen: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        self.upstream = upstream
        self._listen = listen
        self.plan = FaultPlan()
        self.stats = ProxyStats()
        self._plan_base = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._writers: set[asyncio.StreamWriter] = set()
        self.address: tuple[str, int] = listen

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start")

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        try:
            fut.result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._loop = None

    def set_fault(self, plan: FaultPlan) -> None:
        """Applies at once to open connections and to new ones."""
        self._plan_base = self.stats.bytes_up
        self.plan = plan

    @property
    def endpoint(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    # -- internals ------------------------------------------------------------------------------
    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._server = loop.run_until_complete(asyncio.start_server(self._handle, *self._listen))
        sock = self._server.sockets[0]
        self.address = sock.getsockname()[:2]
        self._ready.set()
        loop.run_forever()
        # Connections still open at stop: finish their handlers on this loop (their ``finally``
        # closes sockets), not later in the garbage collector after the loop is closed.
        pending = asyncio.all_tasks(loop)
        for t in pending:
            t.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            _abort(w)
        self._writers.clear()

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            u_reader, u_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _abort(c_writer)
            return
        idx = len(self.stats.by_connection)
        self.stats.connections += 1
        self.stats.open_connections += 1
        self.stats.by_connection.append(0)
        self._writers.update((c_writer, u_writer))
        up = asyncio.create_task(self._pump_up(idx, c_reader, u_writer, c_writer))
        down = asyncio.create_task(self._pump_down(u_reader, c_writer))
        try:
            done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            if up in done and not up.cancelled() and up.exception() is None and up.result() == "eof":
                await down  # the client finished sending; let the upstream's answer drain
        except (ConnectionError, OSError):
            pass
        finally:
            for t in (up, down):
                t.cancel()
            for w in (c_writer, u_writer):
                self._writers.discard(w)
                _close(w)
            self.stats.open_connections -= 1

    async def _pump_up(
        self, idx: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: asyncio.StreamWriter
    ) -> str:
        passed = 0
        since_flip = 0
        data = b""  # read but not yet forwarded
        while True:
            # The plan is looked at again once bytes are in hand: a read that began before
            # set_fault() must not carry its bytes past a fault armed meanwhile.
            plan = self.plan
            seen = passed if plan.per_connection else self.stats.bytes_up - self._plan_base
            if plan.kind is FaultKind.RESET and seen >= plan.after_bytes:
                if plan.once:
                    self.plan = FaultPlan()
                    self.stats.resets += len(self._writers) // 2
                    for w in list(self._writers):
                        _abort(w)
                    return "reset"
                self.stats.resets += 1
                _abort(writer)
                _abort(client)
                return "reset"
            if plan.kind is FaultKind.BLACKHOLE and seen >= plan.after_bytes:
                await asyncio.sleep(0.05)  # hold the connection open, forward nothing
                continue
            if not data:
                data = await reader.read(_CHUNK)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()  # half-close: the reply may still flow back
                    return "eof"
                continue
            rest = b""
            if plan.kind is not FaultKind.NONE and seen < plan.after_bytes < seen + len(data):
                # bytes straddling the fault's start: the part before it goes through untouched
                data, rest = data[: plan.after_bytes - seen], data[plan.after_bytes - seen :]
            if plan.kind is FaultKind.CORRUPT and seen >= plan.after_bytes:
                buf = bytearray(data)
                pos = plan.corrupt_every - since_flip - 1
                while pos < len(buf):
                    buf[pos] ^= 0x01
                    self.stats.corrupted_bytes += 1
                    pos += plan.corrupt_every
                since_flip = (since_flip + len(buf)) % plan.corrupt_every
                data = bytes(buf)
            if plan.kind is FaultKind.THROTTLE and seen >= plan.after_bytes:
                await asyncio.sleep(len(data) / plan.rate_bytes_per_s)
            writer.write(data)
            await writer.drain()
            passed += len(data)
            self.stats.bytes_up += len(data)
            self.stats.by_connection[idx] = passed
            data = rest

    async def _pump_down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            data = await reader.read(_CHUNK)
            if not data:
                return
            writer.write(data)
            await writer.drain()
            self.stats.bytes_down += len(data)


def _abort(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


def _close(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
    except Exception:
        pass
