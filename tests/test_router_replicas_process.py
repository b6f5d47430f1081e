"""Router replicas as processes, the way pods run them: one killed with requests in flight
(the others keep serving; nothing hangs; the engines keep nothing open), and SIGTERM's drain
(docs/router-replicas.md)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import httpx
from replica_helpers import RouterProcess
from router_helpers import FakeBackend, words
from test_router_replicas import _completion, _raw

from prfaas_plugin.faults.matrix import until


# -- replicas as processes: kill one, drain one ---------------------------------------------------
def _stream(url: str, body: dict, out: dict, key: str) -> None:
    """One streamed completion; records "done" (the [DONE] line arrived) or the error's type."""
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as resp:
            text = "".join(resp.iter_text())
        out[key] = "done" if resp.status_code == 200 and "[DONE]" in text else f"http {resp.status_code}"
    except httpx.TimeoutException as exc:
        out[key] = f"hung: {type(exc).__name__}"
    except httpx.HTTPError as exc:
        out[key] = f"error: {type(exc).__name__}"


def _all_closed(engines: list[FakeBackend]) -> bool:
    return all(e.open_requests == 0 for e in engines)


def test_killing_a_replica_loses_only_its_own_requests(tiny_tokenizer_dir, tmp_path: Path) -> None:
    remote = [FakeBackend("prefill", prefill_delay_s=0.8).start()]
    local = [FakeBackend("both", decode_delay_s=1.5).start() for _ in range(2)]
    engines = remote + local
    raw = _raw(remote, local, str(tiny_tokenizer_dir), replicas={"load_scrape_s": 0.2})
    a, b = RouterProcess(raw, tmp_path, "a"), RouterProcess(raw, tmp_path, "b")
    a.wait_up(), b.wait_up()
    try:
        out: dict[str, str] = {}
        threads = []
        for i in range(8):  # half long (a remote prefill and a transfer in flight), half short
            body = _completion(words(80 if i % 2 else 8, start=i), stream=True)
            for name, rep in (("a", a), ("b", b)):
                t = threading.Thread(target=_stream, args=(rep.url, body, out, f"{name}{i}"))
                t.start()
                threads.append(t)
        # every request has reached an engine: 16 decodes open, 8 producers in flight or done
        assert until(lambda: sum(len(e.seen) for e in local) == 16 and len(remote[0].seen) == 8, 20), (
            [len(e.seen) for e in engines],
            out,
        )
        a.signal(signal.SIGKILL)
        for t in threads:
            t.join(timeout=40)
            assert not t.is_alive(), "a client hung"
        assert all(out[f"b{i}"] == "done" for i in range(8)), out
        lost = [k for k in out if k.startswith("a") and out[k] != "done"]
        assert lost, "the kill cut none of the dead replica's requests"
        assert not any(v.startswith("hung") for v in out.values()), out
        assert all(v == "done" or v.startswith("error") for v in out.values()), out
        # the engines were left with nothing open (the kill closed the dead replica's sockets, so
        # they aborted its requests: no decode waiting on KV, no producer holding blocks) ...
        assert until(lambda: _all_closed(engines), 10), [e.open_requests for e in engines]
        assert any(s.aborted for e in engines for s in e.seen), "the kill cut nothing in flight"
        # ... and the clients' retries through the Service reach the survivor and succeed
        retry: dict[str, str] = {}
        for k, v in out.items():
            if v != "done":
                i = int(k[1:])
                _stream(b.url, _completion(words(80 if i % 2 else 8, start=i), stream=True), retry, k)
        assert retry and all(v == "done" for v in retry.values()), retry
    finally:
        a.stop()
        b.stop()
        for e in engines:
            e.stop()


def test_sigterm_drains_open_requests_within_the_grace_period_then_exits(tiny_tokenizer_dir, tmp_path: Path) -> None:
    """Two routers at once (their start-ups overlap): one whose requests finish within its grace
    period, one whose request outlasts it."""
    quick, slow = FakeBackend("both", decode_delay_s=1.5).start(), FakeBackend("both", decode_delay_s=30).start()
    reps = []
    for name, engine, grace in (("quick", quick, 20), ("slow", slow, 0.5)):
        raw = _raw([], [engine], str(tiny_tokenizer_dir), replicas={"drain_grace_s": grace})
        raw["clusters"] = raw["clusters"][1:]
        reps.append(RouterProcess(raw, tmp_path, name))
    q, s = (r.wait_up() for r in reps)
    try:
        out: dict[str, str] = {}
        threads = [
            threading.Thread(target=_stream, args=(q.url, _completion(words(8), stream=True), out, f"q{i}"))
            for i in range(3)
        ]
        threads.append(threading.Thread(target=_stream, args=(s.url, _completion(words(8), stream=True), out, "s")))
        for t in threads:
            t.start()
        assert until(lambda: quick.open_requests == 3 and slow.open_requests == 1, 10)
        q.signal(signal.SIGTERM)
        s.signal(signal.SIGTERM)
        # both stop accepting at once ...
        assert until(lambda: _refused(q.url) and _refused(s.url), 10), "a draining router still accepts connections"
        for t in threads:
            t.join(timeout=30)
            assert not t.is_alive(), "a client hung"
        # ... the quick one's requests finish; the slow one's is cut (an error, not a hang) ...
        assert [out[f"q{i}"] for i in range(3)] == ["done"] * 3, out
        assert out["s"].startswith("error"), out
        # ... and both exit (uvicorn re-raises the signal once it has shut down)
        assert q.proc.wait(timeout=20) in (0, -signal.SIGTERM)
        assert s.proc.wait(timeout=20) in (0, -signal.SIGTERM)
        # the cut request was aborted on its engine, not left running
        assert until(lambda: slow.open_requests == 0, 10), "the engine kept a request the router dropped"
        assert slow.seen[0].aborted
    finally:
        for r in reps:
            r.stop()
        quick.stop()
        slow.stop()


def _refused(url: str) -> bool:
    try:
        httpx.get(url + "/health", timeout=1)
    except httpx.ConnectError:
        return True
    except httpx.HTTPError:
        return False
    return False
