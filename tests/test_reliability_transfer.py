"""Issue 8 on the transfer engine alone: faults on the wide-area link through a fault proxy.
Every request lands bit-exact or fails with a typed error in time; nothing hangs or leaks; the
engine recovers once the fault clears. Corruption runs once per integrity choice: each plaintext
checksum, and TLS without a checksum (its AEAD must catch the flipped bits)."""

from __future__ import annotations

import pytest

from prfaas_plugin.faults.matrix import CaseResult, FaultCase, default_cases, run_case
from prfaas_plugin.transfer import ReceiverConfig, SenderConfig, TlsConfig

REQUEST_BYTES = 2 << 20
CASES = default_cases(REQUEST_BYTES)
CORRUPT = next(c for c in CASES if c.name == "corrupted bytes")


def _check(case: FaultCase, res: CaseResult) -> None:
    print(f"\n{res}")
    assert res.wrong_data == 0, res
    assert res.hung == 0, res
    assert not res.untyped_errors, res
    assert res.survived + res.failed_cleanly == res.injected, res
    # Failures surface by the deadline (plus scheduling slack on a loaded 2-core box), not later.
    assert res.max_resolve_s <= case.deadline_s + 2.0, res
    assert res.recovered, res
    assert not res.leaks, res


@pytest.mark.parametrize("case", [c for c in CASES if c is not CORRUPT], ids=lambda c: c.name)
def test_fault_case(case) -> None:
    _check(case, run_case(case, requests=4, request_bytes=REQUEST_BYTES))


@pytest.mark.parametrize("checksum", ["xxh3-64", "crc32c", "crc32"])
def test_corruption_on_plaintext(checksum) -> None:
    """Both sides accept only ``checksum``; the default configuration picks xxh3-64."""
    rx = ReceiverConfig(checksums=(checksum,))
    tx = SenderConfig(chunk_bytes=256 << 10, checksums=(checksum,))
    _check(CORRUPT, run_case(CORRUPT, requests=4, request_bytes=REQUEST_BYTES, receiver=rx, sender=tx))


def test_corruption_on_tls_without_checksum(tmp_path) -> None:
    pytest.importorskip("cryptography")
    from transfer_helpers import make_pki

    pki = make_pki(tmp_path)
    cert, key = pki["server"]
    rx = ReceiverConfig(tls=TlsConfig(cert_file=cert, key_file=key))
    tx = SenderConfig(chunk_bytes=256 << 10, tls=TlsConfig(ca_file=pki["ca.paths"][0], server_name="localhost"))
    assert rx.effective_checksums[0] == tx.effective_checksums[0] == "none"
    _check(CORRUPT, run_case(CORRUPT, requests=4, request_bytes=REQUEST_BYTES, receiver=rx, sender=tx))
