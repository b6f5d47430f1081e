"""Runs the Triton interpreter cases (tests/kernels_triton_cases.py) in a fresh interpreter.

TRITON_INTERPRET is read when kernels are decorated; in one pytest process another test module
(vLLM, transformers) may already have imported triton and compiled-mode JIT helpers, which the
interpreter then refuses to call. A child process with the variable set from the start is the
only reliable way to run them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_triton_kernels_bit_exact_under_the_interpreter() -> None:
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels_triton_cases.py"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
