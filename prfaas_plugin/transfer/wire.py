"""Data-plane framing: what a raw TCP data connection carries.

A connection starts with an 8-byte hello (magic + version) and then carries DATA frames only,
sender to receiver: a fixed 44-byte header followed by ``length`` payload bytes. Receipts,
resend requests and completion travel on the gRPC session, so the data sockets are one-way
(no thread on either side has to share a TLS socket between reading and writing).

The per-chunk checksum is a 32-bit CRC, negotiated per session: CRC-32C (Castagnoli, the
iSCSI/ext4/RDMA choice) through the ``crc32c`` package where both sides have it, else zlib's
CRC-32. A CRC is the right tool here: it is there to catch corruption (a bad NIC offload,
memory errors, a bug that writes the wrong slice), not attacks, which TLS covers; it detects
every burst error up to 32 bits; and both implementations release the GIL on large buffers.
Speed decides between them: on this 2-vCPU Zen 4 host zlib's CRC-32 runs at about 3 GB/s,
which cost 35-60 % of loopback goodput in bench/transfer.py, while the SSE4.2 CRC-32C runs at
about 14 GB/s.
"""

from __future__ import annotations

import socket
import struct
import zlib
from collections.abc import Callable, Sequence
from typing import Any

HELLO = b"PKVDATA1"
_HEADER = struct.Struct("<4sB3x16sIQII")
HEADER_SIZE = _HEADER.size  # 44
FRAME_MAGIC = b"PKV1"
KIND_DATA = 1


def pack_header(session_key: bytes, item: int, offset: int, length: int, crc: int) -> bytes:
    return _HEADER.pack(FRAME_MAGIC, KIND_DATA, session_key, item, offset, length, crc)


def unpack_header(buf: Any) -> tuple[bytes, int, int, int, int]:
    """Returns (session_key, item, offset, length, crc); raises ValueError on a bad frame."""
    magic, kind, key, item, offset, length, crc = _HEADER.unpack(buf)
    if magic != FRAME_MAGIC or kind != KIND_DATA:
        raise ValueError(f"bad data frame header (magic={magic!r}, kind={kind})")
    return key, item, offset, length, crc


def crc32(view: Any, value: int = 0) -> int:
    return zlib.crc32(view, value) & 0xFFFFFFFF


def _no_checksum(view: Any, value: int = 0) -> int:
    return 0


CHECKSUMS: dict[str, Callable[[Any], int]] = {"crc32": crc32}
try:
    from crc32c import crc32c as _crc32c
except ImportError:  # optional: zlib's CRC-32 is always there
    pass
else:
    CHECKSUMS["crc32c"] = _crc32c
#: "none" exists for diagnostics only (bench/transfer.py measures what checksumming costs);
#: both sides must opt in to it explicitly.
CHECKSUMS["none"] = _no_checksum


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


def recv_exact_checksummed(sock: socket.socket, view: memoryview, checksum: Callable[..., int]) -> int:
    """``recv_exact`` that folds each received piece into a running checksum while the piece is
    still in cache: a second pass over a 1 MiB chunk after it landed reads it back from L2/L3,
    which cost about a tenth of loopback goodput on a 2-vCPU host (bench/transfer.py)."""
    got, n, value = 0, len(view), 0
    while got < n:
        r = sock.recv_into(view[got:], n - got)
        if r == 0:
            raise ConnectionError("peer closed the data connection")
        value = checksum(view[got : got + r], value)
        got += r
    return value


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
