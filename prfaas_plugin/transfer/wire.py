"""Data-plane framing: what a raw TCP data connection carries.

A connection starts with an 8-byte hello (magic + version) and then carries DATA frames only,
sender to receiver: a fixed header followed by ``length`` payload bytes. Receipts, resend
requests and completion travel on the gRPC session, so the data sockets are one-way (no thread
on either side has to share a TLS socket between reading and writing).

The header is 44 bytes with a 32-bit checksum (kind 1) or 48 with a 64-bit one (kind 2: the
same fields, the checksum widened in place). The kind byte says which, so a receiver reads 44
bytes and then the last 4 only for kind 2, and peers that only know CRC-32C (kind 1) keep
talking to this version unchanged.

The per-chunk checksum fits the channel; it is negotiated per session (the receiver takes the
sender's first offer it accepts):

* ``none`` on TLS: every TLS record is authenticated (AEAD), so an altered byte already breaks
  the connection and the frame is resent on another one; a second checksum buys nothing there.
  On a plaintext channel ``none`` is refused at configuration unless a diagnostic flag says so.
* ``xxh3-64`` (the ``xxhash`` package) on plaintext: about 1.5x the speed of CRC-32C here
  (23 against 15 GB/s on 1 MiB pieces) and 64 bits wide. It is there to catch corruption (a bad
  NIC offload, memory errors, a bug that writes the wrong slice), not attacks, which TLS covers.
* ``crc32c`` (the ``crc32c`` package, SSE4.2) for peers that only offer it, and zlib's ``crc32``
  for the oldest ones.
"""

from __future__ import annotations

import socket
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

HELLO = b"PKVDATA1"
#: Everything up to the checksum's low 32 bits; kind 2 appends the high 32 bits.
_HEADER = struct.Struct("<4sB3x16sIQII")
_HEADER64 = struct.Struct("<4sB3x16sIQIQ")
HEADER_SIZE = _HEADER.size  # 44: what a receiver reads first
HEADER64_SIZE = _HEADER64.size  # 48
FRAME_MAGIC = b"PKV1"
KIND_DATA = 1  # 32-bit checksum
KIND_DATA64 = 2  # 64-bit checksum


def pack_header(session_key: bytes, item: int, offset: int, length: int, checksum: int, wide: bool = False) -> bytes:
    """A frame header; ``wide`` for a 64-bit checksum (``Checksum.wide``)."""
    if wide:
        return _HEADER64.pack(FRAME_MAGIC, KIND_DATA64, session_key, item, offset, length, checksum)
    return _HEADER.pack(FRAME_MAGIC, KIND_DATA, session_key, item, offset, length, checksum)


def unpack_header(buf: Any) -> tuple[bytes, int, int, int, int]:
    """Returns (session_key, item, offset, length, checksum) from a whole header (44 or 48
    bytes, see ``header_size``); raises ValueError on a bad frame."""
    if len(buf) == HEADER64_SIZE:
        magic, kind, key, item, offset, length, value = _HEADER64.unpack(buf)
        want = KIND_DATA64
    else:
        magic, kind, key, item, offset, length, value = _HEADER.unpack(buf)
        want = KIND_DATA
    if magic != FRAME_MAGIC or kind != want:
        raise ValueError(f"bad data frame header (magic={magic!r}, kind={kind})")
    return key, item, offset, length, value


def header_size(first: Any) -> int:
    """Whole header size given its first ``HEADER_SIZE`` bytes (the kind byte decides)."""
    if bytes(first[:4]) != FRAME_MAGIC or first[4] not in (KIND_DATA, KIND_DATA64):
        raise ValueError(f"bad data frame header (magic={bytes(first[:4])!r}, kind={first[4]})")
    return HEADER64_SIZE if first[4] == KIND_DATA64 else HEADER_SIZE


def recv_header(sock: socket.socket, buf: bytearray) -> tuple[int, tuple[bytes, int, int, int, int]]:
    """Read one header into ``buf`` (at least ``HEADER64_SIZE`` bytes): (its size, its fields)."""
    view = memoryview(buf)
    recv_exact(sock, view[:HEADER_SIZE])
    n = header_size(view)
    if n > HEADER_SIZE:
        recv_exact(sock, view[HEADER_SIZE:n])
    return n, unpack_header(view[:n])


class Running(Protocol):
    """A checksum folded piece by piece (the receiver hashes each ``recv_into`` while hot)."""

    def update(self, view: Any) -> None: ...

    def intdigest(self) -> int: ...


class _Crc:
    __slots__ = ("fn", "value")

    def __init__(self, fn: Callable[[Any, int], int]) -> None:
        self.fn, self.value = fn, 0

    def update(self, view: Any) -> None:
        self.value = self.fn(view, self.value)

    def intdigest(self) -> int:
        return self.value


@dataclass(frozen=True)
class Checksum:
    """One per-chunk checksum algorithm: a one-shot digest (sender, gRPC plane) and a running
    one (TCP receiver); ``wide`` = 64 bits (kind 2 frames)."""

    name: str
    digest: Callable[[Any], int]
    running: Callable[[], Running] | None  # None: no checksum ("none")
    wide: bool = False

    def __call__(self, view: Any) -> int:
        return self.digest(view)


def crc32(view: Any, value: int = 0) -> int:
    return zlib.crc32(view, value) & 0xFFFFFFFF


def _zero(view: Any) -> int:
    return 0


#: Names in the order a default plaintext endpoint prefers them.
PLAINTEXT_DEFAULT: tuple[str, ...] = ("xxh3-64", "crc32c", "crc32")
#: TLS already authenticates every byte: no checksum first, the others for peers that insist.
TLS_DEFAULT: tuple[str, ...] = ("none", *PLAINTEXT_DEFAULT)
KNOWN: frozenset[str] = frozenset(TLS_DEFAULT)

CHECKSUMS: dict[str, Checksum] = {
    "crc32": Checksum("crc32", crc32, lambda: _Crc(crc32)),
    "none": Checksum("none", _zero, None),
}
try:
    from crc32c import crc32c as _crc32c
except ImportError:  # optional: zlib's CRC-32 is always there
    pass
else:
    CHECKSUMS["crc32c"] = Checksum("crc32c", _crc32c, lambda: _Crc(_crc32c))
try:
    import xxhash as _xxhash
except ImportError:  # a dependency, but a peer without it still negotiates CRC-32C
    pass
else:
    CHECKSUMS["xxh3-64"] = Checksum("xxh3-64", _xxhash.xxh3_64_intdigest, _xxhash.xxh3_64, wide=True)


def available(names: Sequence[str]) -> list[str]:
    """``names`` that this process implements, in the given order."""
    return [n for n in names if n in CHECKSUMS]


def choose_checksum(offered: Sequence[str], allowed: Sequence[str]) -> str | None:
    """The first of the peer's offers that this side allows and implements (None: no match)."""
    for name in offered or ["crc32"]:
        if name in allowed and name in CHECKSUMS:
            return name
    return None


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock`` straight into its memory; EOF raises ConnectionError."""
    got, n = 0, len(view)
    while got < n:
        r = sock.recv_into(view[got:], n - got)
        if r == 0:
            raise ConnectionError("peer closed the data connection")
        got += r


def recv_exact_checksummed(sock: socket.socket, view: memoryview, running: Running) -> int:
    """``recv_exact`` that folds each received piece into a running checksum while the piece is
    still in cache: a second pass over a frame after it landed reads it back from memory,
    which cost about a tenth of loopback goodput on a 2-vCPU host (bench/transfer.py)."""
    got, n = 0, len(view)
    update = running.update
    while got < n:
        r = sock.recv_into(view[got:], n - got)
        if r == 0:
            raise ConnectionError("peer closed the data connection")
        update(view[got : got + r])
        got += r
    return running.intdigest()


def drain(sock: socket.socket, n: int, scratch: memoryview) -> None:
    """Read and discard ``n`` payload bytes to keep the stream in step (late/duplicate frames)."""
    while n > 0:
        step = min(n, len(scratch))
        recv_exact(sock, scratch[:step])
        n -= step


def send_frame(sock: socket.socket, header: bytes, payload: memoryview, use_sendmsg: bool) -> None:
    """Header and payload in one syscall where possible, without copying the payload."""
    if not use_sendmsg:
        sock.sendall(header)
        sock.sendall(payload)
        return
    bufs: list[Any] = [header, payload]
    total = len(header) + len(payload)
    sent = 0
    while sent < total:
        n = sock.sendmsg(bufs)
        sent += n
        if sent >= total:
            return
        # Drop what went out and continue from the partial buffer.
        while n > 0:
            first = bufs[0]
            if n >= len(first):
                n -= len(first)
                bufs.pop(0)
            else:
                bufs[0] = memoryview(first)[n:]
                n = 0


def _core_max(name: str) -> int:
    try:
        with open(f"/proc/sys/net/core/{name}") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError):
        return 0


def tune_socket(sock: socket.socket, buffer_bytes: int) -> None:
    """Ask for big socket buffers, but only where the kernel will grant them.

    Setting SO_SNDBUF/SO_RCVBUF on Linux switches off TCP buffer autotuning and the value is
    clamped to net.core.[wr]mem_max (stock: about 208 KiB), which is far *below* what
    autotuning reaches (tcp_wmem/tcp_rmem max: 4/32 MiB). So a buffer is requested only when
    the core limit lets it be at least ``buffer_bytes``; otherwise autotuning is kept."""
    if buffer_bytes > 0:
        for opt, limit in ((socket.SO_SNDBUF, "wmem_max"), (socket.SO_RCVBUF, "rmem_max")):
            if _core_max(limit) >= buffer_bytes:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, buffer_bytes)
                except OSError:
                    pass
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
