"""bench/gpu_check.py is run once on a lent GPU; this keeps its flow working on CPU tensors
(``--cpu --tiny``: a few hundred tokens, two layers of each kind) so the script does not rot
between GPU runs. Figures are not checked here (benchmarks own those), only that every stage
ran and the loopback transfer arrived bit-exact."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_its_whole_flow_on_cpu_tensors(monkeypatch, capsys) -> None:
    pytest.importorskip("grpc")
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    monkeypatch.setattr(sys, "argv", ["bench/gpu_check.py"])
    import gpu_check

    res = gpu_check.main(["--cpu", "--tiny", "--no-append"])
    assert {r["model"] for r in res["transfer"]} == set(gpu_check.MODELS)
    assert all(r["bit_exact"] and r["goodput"] > 0 and r["ceiling"] > 0 for r in res["transfer"])
    assert len(res["kernels"]) == 4 and all(r["pack"] > 0 and r["staged"] > 0 for r in res["kernels"])
    assert res["matmul"]["alone_ms"] > 0 and res["matmul"]["busy_ms"] > 0
    out = capsys.readouterr().out
    assert "raw multi-socket ceiling" in out and "Forward-like matmul loop" in out
