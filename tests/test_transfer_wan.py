"""The emulated WAN link used by bench/transfer.py case 2: built, measured, torn down."""

from __future__ import annotations

import subprocess

import pytest

from prfaas_plugin.transfer.wan import WanLink, WanUnavailable


@pytest.mark.netns
def test_wan_link_delays_and_cleans_up():
    try:
        link = WanLink(rate_gbit=1.0, rtt_ms=20.0)
        link.__enter__()
    except WanUnavailable as e:
        pytest.skip(f"cannot build the emulated link here: {e}")
    try:
        rtt = link.tcp_connect_ms()
        assert 18.0 <= rtt <= 200.0, rtt  # two 10 ms legs; a loaded host only adds
        names = list(link.ns.values())
    finally:
        link.close()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names)
