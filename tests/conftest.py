"""Fixtures shared across test files. Each builds something once per test session that several
files use; file-specific fixtures stay in their files."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The word-level tokenizer the router tests' fake engines speak (router_helpers.py)."""
    from router_helpers import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir: Path):  # -> PromptTokenizer (imported lazily: it pulls tokenizers)
    from prfaas_plugin.router.tokenize import PromptTokenizer

    return PromptTokenizer(str(tiny_tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the tiny random-weight models are built (prfaas_plugin/demo/tiny_models.py); one
    folder per session so every vLLM test that serves a tiny model builds it once."""
    return tmp_path_factory.getbasetemp() / "models"


@pytest.fixture
def fabric():
    """A LoopbackFabric injected as the vLLM worker's transport (``WorkerSide.transport_factory``),
    so worker halves move KV in one process; the real factory is put back afterwards."""
    pytest.importorskip("vllm")
    from loopback_fabric import LoopbackFabric

    from prfaas_plugin.engines.vllm.worker import WorkerSide

    fab = LoopbackFabric()
    old = WorkerSide.transport_factory
    WorkerSide.transport_factory = staticmethod(lambda spec: fab)
    try:
        yield fab
    finally:
        WorkerSide.transport_factory = old
