"""An in-process transfer fabric for the engine adapters' tests.

``LoopbackFabric`` is an in-process implementation of ``prfaas_plugin.transfer.api`` and of the
``Transport`` of ``prfaas_plugin.transfer.binding`` (the transfer engine is a neighbour of the
vLLM connector and the SGLang backend, not the component under test). It keeps
the contract's rules that the backend relies on: only expected sessions with the right token
and fingerprint are accepted, ``send`` is asynchronous, every item is delivered into the
receiver's sink, both ``done`` futures resolve (with a ``TransferError`` on failure), and
aborts, deadlines and a dead peer are reported on both sides. Knobs let tests hold deliveries
or kill the link mid-request.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

import numpy as np

from prfaas_plugin.transfer.api import (
    Aborted,
    AuthError,
    FingerprintMismatch,
    ItemSpec,
    LayoutFingerprint,
    PeerGone,
    ProtocolError,
    ReceiveHandle,
    ReceiveSink,
    SendHandle,
    TransferError,
    TransferManifest,
    TransferReceiver,
    TransferSender,
    TransferTimeout,
)

_ports = itertools.count(40000)


def _resolve(fut: Future, exc: BaseException | None = None, value: Any = None) -> None:
    if fut.done():
        return
    try:
        if exc is None:
            fut.set_result(value)
        else:
            fut.set_exception(exc)
    except Exception:  # lost a race with the other side: already resolved
        pass


class _Session:
    def __init__(self, rid: str, token: str, fp: LayoutFingerprint, sink: ReceiveSink, deadline_s: float):
        self.request_id = rid
        self.token = token
        self.fingerprint = fp
        self.sink = sink
        self.recv_done: Future = Future()
        self.send_done: Future | None = None
        self.manifest: TransferManifest | None = None
        self.landed: set[str] = set()
        self.timer = threading.Timer(deadline_s, self.fail, args=(TransferTimeout(f"{rid}: deadline passed"),))
        self.timer.daemon = True
        self.timer.start()

    def fail(self, exc: TransferError) -> None:
        self.timer.cancel()
        _resolve(self.recv_done, exc)
        if self.send_done is not None:
            _resolve(self.send_done, exc)


class _RecvHandle(ReceiveHandle):
    def __init__(self, s: _Session):
        self.request_id = s.request_id
        self.done = s.recv_done
        self._s = s

    def abort(self, reason: str = "aborted by receiver") -> None:
        self._s.fail(Aborted(reason))

    def progress(self) -> Mapping[str, Any]:
        return {"items_completed": len(self._s.landed)}


class _SendHandle(SendHandle):
    def __init__(self, fabric: LoopbackFabric, s: _Session | None, rid: str, done: Future):
        self.request_id = rid
        self.done = done
        self._fabric = fabric
        self._s = s

    def send(self, name: str, data: Any) -> None:
        if self.done.done() and self.done.exception() is not None:
            raise self.done.exception()  # type: ignore[misc]
        if self._s is None:
            return
        buf = memoryview(np.ascontiguousarray(data)).cast("B")
        self._fabric.sent_names.append(name)
        self._fabric._q.put((self._s, name, buf))

    def abort(self, reason: str = "aborted by sender") -> None:
        if self._s is not None:
            self._s.fail(Aborted(reason))
        else:
            _resolve(self.done, Aborted(reason))

    def progress(self) -> Mapping[str, Any]:
        return {}


class _Receiver(TransferReceiver):
    def __init__(self, fabric: LoopbackFabric, host: str, port: int):
        self._fabric = fabric
        self._endpoint = f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port or next(_ports)}"
        self.sessions: dict[str, _Session] = {}
        fabric.receivers[self._endpoint] = self

    @property
    def endpoint(self) -> str:
        return self._endpoint

    def expect(self, request_id, token, fingerprint, sink, deadline_s=60.0) -> ReceiveHandle:
        s = _Session(request_id, token, fingerprint, sink, deadline_s)
        self.sessions[request_id] = s
        return _RecvHandle(s)

    def close(self) -> None:
        self._fabric.receivers.pop(self._endpoint, None)
        for s in list(self.sessions.values()):
            s.fail(PeerGone("receiver closed"))


class _Sender(TransferSender):
    def __init__(self, fabric: LoopbackFabric):
        self._fabric = fabric

    def open(self, endpoint, manifest, token, deadline_s=60.0) -> SendHandle:
        done: Future = Future()
        rx = self._fabric.receivers.get(endpoint)
        s = rx.sessions.get(manifest.request_id) if rx is not None else None
        if rx is None:
            _resolve(done, PeerGone(f"nothing listens on {endpoint}"))
            return _SendHandle(self._fabric, None, manifest.request_id, done)
        if s is None or s.token != token:
            _resolve(done, AuthError(f"session {manifest.request_id!r} not expected or bad token"))
            return _SendHandle(self._fabric, None, manifest.request_id, done)
        diff = s.fingerprint.diff(manifest.fingerprint)
        s.send_done = done
        if diff:
            s.fail(FingerprintMismatch("; ".join(diff)))
        else:
            s.manifest = manifest
            self._fabric.opened.append(manifest)
        return _SendHandle(self._fabric, s, manifest.request_id, done)

    def close(self) -> None:
        pass


class LoopbackFabric:
    """Wires senders to receivers in one process. ``hold`` pauses deliveries; ``cut`` makes
    every delivery fail as if the link died."""

    def __init__(self) -> None:
        self.receivers: dict[str, _Receiver] = {}
        self.opened: list[TransferManifest] = []
        self.sent_names: list[str] = []
        self.hold = threading.Event()
        self.hold.set()
        self.cut = False
        self._q: queue.Queue[tuple[_Session, str, memoryview]] = queue.Queue()
        threading.Thread(target=self._deliver_loop, daemon=True).start()

    # Transport protocol of prfaas_plugin.transfer.binding
    def sender(self) -> TransferSender:
        return _Sender(self)

    def receiver(self, host: str, port: int, data_port: int = 0, advertise_data: str | None = None) -> TransferReceiver:
        return _Receiver(self, host, port)

    def _deliver_loop(self) -> None:
        while True:
            s, name, buf = self._q.get()
            self.hold.wait()
            try:
                self._deliver(s, name, buf)
            except TransferError as exc:
                s.fail(exc)
            except Exception as exc:  # the sink refused the item
                s.fail(ProtocolError(f"{name}: {exc}"))

    def _deliver(self, s: _Session, name: str, buf: memoryview) -> None:
        if s.recv_done.done():
            return
        if self.cut:
            raise PeerGone("connection reset by peer")
        assert s.manifest is not None
        item = next((i for i in s.manifest.items if i.name == name), None)
        if item is None or item.nbytes != buf.nbytes or name in s.landed:
            raise ProtocolError(f"{name}: not in the manifest or wrong size/duplicate")
        dst = s.sink.buffer_for(item)
        if dst.nbytes != item.nbytes:
            raise ProtocolError(f"{name}: sink gave {dst.nbytes} bytes for {item.nbytes}")
        dst.cast("B")[:] = buf
        s.sink.item_done(item)
        s.landed.add(name)
        if len(s.landed) == len(s.manifest.items):
            s.timer.cancel()
            _resolve(s.recv_done, value=s.manifest)
            if s.send_done is not None:
                _resolve(s.send_done, value=None)


def item(name: str, nbytes: int) -> ItemSpec:
    return ItemSpec(name, nbytes)
