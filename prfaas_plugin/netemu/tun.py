"""Opening Linux tun devices (no packet-info header) with one ioctl."""

from __future__ import annotations

import fcntl
import os
import struct

_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
IFNAMSIZ = 16


def open_tun(name: str) -> int:
    """Create (or attach to) tun device ``name`` and return its file descriptor.

    The device may afterwards be moved into another network namespace with
    ``ip link set NAME netns NS``; the descriptor stays attached to it.
    """
    if not name or len(name) >= IFNAMSIZ:
        raise ValueError(f"tun device name must be 1-{IFNAMSIZ - 1} characters, got {name!r}")
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd
