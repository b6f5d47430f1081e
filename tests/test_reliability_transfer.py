"""Issue 8 on the transfer engine alone: faults on the wide-area link through a fault proxy.
Every request lands bit-exact or fails with a typed error in time; nothing hangs or leaks; the
engine recovers once the fault clears."""

from __future__ import annotations

import pytest

from prfaas_plugin.faults.matrix import default_cases, run_case

REQUEST_BYTES = 2 << 20


@pytest.mark.parametrize("case", default_cases(REQUEST_BYTES), ids=lambda c: c.name)
def test_fault_case(case) -> None:
    res = run_case(case, requests=4, request_bytes=REQUEST_BYTES)
    print(f"\n{res}")
    assert res.wrong_data == 0, res
    assert res.hung == 0, res
    assert not res.untyped_errors, res
    assert res.survived + res.failed_cleanly == res.injected, res
    # Failures surface by the deadline (plus scheduling slack on a loaded 2-core box), not later.
    assert res.max_resolve_s <= case.deadline_s + 2.0, res
    assert res.recovered, res
    assert not res.leaks, res
