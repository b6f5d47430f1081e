"""protocol/: the one home of the request protocol, the transfer service identity and the metric
names -- its functions, the generated docs, and the rule that nothing else spells a name."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

from prfaas_plugin.protocol import metrics as M
from prfaas_plugin.protocol import reference
from prfaas_plugin.protocol.requests import (
    REQUEST_PROTOCOL_VERSION,
    BadParams,
    outcome_params,
    parse_params,
    producer_outcome,
    sglang_bodies,
    vllm_bodies,
)

ROOT = Path(__file__).resolve().parents[1]


def test_vllm_bodies_round_trip_through_the_connectors_parser() -> None:
    body = {"model": "m", "prompt": "hi", "max_tokens": 9, "stream": True, "stream_options": {"include_usage": True}}
    prod, cons, tid = vllm_bodies(body, "10.0.0.7:15600", 30.0)
    p, c = parse_params(prod["kv_transfer_params"]), parse_params(cons["kv_transfer_params"])
    assert p is not None and c is not None
    assert (p.role, c.role) == ("producer", "consumer")
    assert p.transfer_id == c.transfer_id == tid and p.token == c.token and len(p.token) >= 32
    assert p.decode_endpoint == "10.0.0.7:15600" and p.deadline_s == c.deadline_s == 30.0
    # the producer prefills only and answers whole; the consumer keeps the client's options
    assert prod["max_tokens"] == 1 and prod["stream"] is False and "stream_options" not in prod
    assert cons["max_tokens"] == 9 and cons["stream"] is True and cons["stream_options"] == {"include_usage": True}
    assert body == {
        "model": "m",
        "prompt": "hi",
        "max_tokens": 9,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert vllm_bodies(body, "h:1", 1.0)[2] != tid  # a fresh id per transfer


@pytest.mark.parametrize("deadline", [0, -1, 3601, math.nan, math.inf, True, "5"])
def test_a_deadline_outside_its_range_or_not_a_number_is_refused(deadline: object) -> None:
    raw = {"prfaas_version": REQUEST_PROTOCOL_VERSION, "role": "consumer", "transfer_id": "a", "token": "b" * 16}
    with pytest.raises(BadParams, match="deadline_s"):
        parse_params({**raw, "deadline_s": deadline})


def test_producer_outcome_reads_what_the_connector_answers() -> None:
    ok = producer_outcome({"kv_transfer_params": outcome_params("t", True, 10, 4096)})
    assert ok.ok and ok.kv_bytes == 4096
    bad = producer_outcome({"kv_transfer_params": outcome_params("t", False, error="boom")})
    assert not bad.ok and bad.error == "boom"
    assert producer_outcome({"choices": []}).ok  # an engine that reports nothing: judged by HTTP status
    assert not producer_outcome("not json").ok
    assert not producer_outcome({"kv_transfer_params": "junk"}).ok


def test_sglang_bodies_share_one_room_and_bracket_ipv6() -> None:
    prod, cons, room = sglang_bodies({"model": "m", "stream": True}, "http://[::1]:30000", 8998)
    assert prod["bootstrap_room"] == cons["bootstrap_room"] == int(room)
    assert prod["bootstrap_host"] == "[::1]" and prod["stream"] is False and cons["stream"] is True


def test_docs_protocol_md_holds_the_generated_reference() -> None:
    doc = (ROOT / "docs" / "protocol.md").read_text()
    assert reference.splice(doc) == doc, "stale: python -m prfaas_plugin.protocol.reference --write docs/protocol.md"


def test_metric_names_are_unique() -> None:
    names = [m.name for m in M.ALL]
    assert len(set(names)) == len(names)
    assert {m.name for m in M.SENT_BYTES} <= set(names)


def _string_constants(tree: ast.AST) -> list[tuple[int, str]]:
    """Every string constant in the code, docstrings excluded (they explain, they do not name)."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_every_metric_name_is_spelled_in_protocol_metrics_alone() -> None:
    """A metric name written out anywhere else -- an exporter, the router's scraper, a test, a
    bench -- is a second home that a rename would leave behind."""
    names = sorted({m.name for m in M.ALL}, key=len, reverse=True)
    home = ROOT / "prfaas_plugin" / "protocol" / "metrics.py"
    offenders = []
    for path in [*ROOT.glob("prfaas_plugin/**/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py")]:
        if path == home:
            continue
        for line, text in _string_constants(ast.parse(path.read_text(), str(path))):
            offenders += [f"{path.relative_to(ROOT)}:{line}: {n}" for n in names if n in text]
    assert offenders == []
