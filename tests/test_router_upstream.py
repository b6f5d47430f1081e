"""The router's HTTP/1.1 client (router/upstream.py) against raw socket servers that send
exactly the bytes each case needs: framing (chunked, length, until close), connection reuse and
expiry, the keep-alive race, early close as the abort signal, timeouts, resets, bad answers,
TLS and read backpressure. The health-probe semantics are in test_router.py."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
import time
from collections.abc import Callable

import pytest

from prfaas_plugin.router.upstream import KEEPALIVE_RACE_S, READ_HIGH_WATER, Unreachable, Upstream, UpstreamError


class RawServer:
    """Accepts connections and runs ``handler(conn, reader)`` for each in a thread."""

    def __init__(self, handler: Callable[[socket.socket, object], None]) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.handler = handler
        self.connections = 0
        self.events: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with conn:
            try:
                self.handler(conn, conn.makefile("rb"))
            except OSError as exc:
                self.events.append(f"oserror {exc}")

    def close(self) -> None:
        self.sock.close()


def read_request(f) -> tuple[bytes, dict[bytes, bytes], bytes] | None:
    line = f.readline()
    if not line:
        return None
    headers = {}
    while (h := f.readline()) not in (b"\r\n", b""):
        k, _, v = h.partition(b":")
        headers[k.strip().lower()] = v.strip()
    body = f.read(int(headers.get(b"content-length", b"0")))
    return line, headers, body


def run(coro):
    return asyncio.run(coro)


async def _with(fn, **kw):
    up = Upstream(
        connect_s=kw.pop("connect_s", 2.0), request_s=kw.pop("request_s", 10.0), keepalive_s=kw.pop("keepalive_s", 60.0)
    )
    await up.start()
    try:
        return await fn(up)
    finally:
        await up.close()


def test_chunks_arrive_as_sent_and_the_request_is_well_formed() -> None:
    seen = []
    go_on = threading.Event()

    def handler(conn, f):
        seen.append(read_request(f))
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n6\r\ndata 1\r\n"
        )
        go_on.wait(5)  # the client must have the first chunk before the rest exists
        conn.sendall(b"6\r\ndata 2\r\n0\r\n\r\n")

    srv = RawServer(handler)

    async def go(up: Upstream):
        s = await up.open(srv.url + "/v1/completions?x=1", {"prompt": "héllo", "stream": True})
        got = []
        async for chunk in s.aiter_raw():
            got.append(chunk)
            go_on.set()
        await s.aclose()
        return s.status_code, s.headers.get("CONTENT-TYPE"), got

    try:
        status, ctype, got = run(_with(go))
    finally:
        srv.close()
    assert status == 200 and ctype == "text/event-stream"
    assert got == [b"data 1", b"data 2"]
    line, headers, body = seen[0]
    assert line == b"POST /v1/completions?x=1 HTTP/1.1\r\n"
    assert headers[b"host"] == f"127.0.0.1:{srv.port}".encode()
    assert headers[b"content-type"] == b"application/json"
    assert body == b'{"prompt": "h\\u00e9llo", "stream": true}'


def test_a_pooled_connection_dropped_before_any_answer_is_retried_once() -> None:
    """The race of an instance closing an idle keep-alive connection just as the router reuses
    it, made deterministic: each connection answers its first request and drops the connection
    once the next one arrived, without answering it."""
    answered, dropped = [0], [0]

    def handler(conn, f):
        if read_request(f) is None:
            return
        body = b'{"choices": [{"index": 0, "text": "ok"}], "kv_transfer_params": {"status": "sent", "bytes": 7}}'
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode()
            + b"\r\nconnection: keep-alive\r\n\r\n"
            + body
        )
        answered[0] += 1
        if read_request(f) is not None:
            dropped[0] += 1  # closed with the request read and not answered

    srv = RawServer(handler)

    async def go(up: Upstream) -> list[int]:
        statuses = []
        for _ in range(3):  # streamed path (the consumer / local answer)
            s = await up.open(srv.url + "/v1/completions", {"prompt": "x"})
            await s.aread()
            await s.aclose()
            statuses.append(s.status_code)
        for _ in range(3):  # read-whole path (the producer)
            status, parsed, _ = await up.post_json(srv.url + "/v1/completions", {}, 5)
            assert parsed["kv_transfer_params"]["bytes"] == 7
            statuses.append(status)
        return statuses

    try:
        assert run(_with(go)) == [200] * 6
        # The server thread counts an answer after its sendall returns, which can be a moment
        # after the client has read it.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (answered[0] == 6 and dropped[0] >= 3):
            time.sleep(0.01)
        assert dropped[0] >= 3, dropped  # the race really happened
        assert answered[0] == 6  # and no request was lost to it or sent twice
    finally:
        srv.close()


def test_a_request_the_instance_held_before_dropping_it_is_not_sent_again() -> None:
    """Only the keep-alive race is retried: a pooled connection dropped without an answer
    ``KEEPALIVE_RACE_S`` or more after the request went out may have run it (a prefill), so the
    caller gets the error and the instance sees the request once."""
    seen: list[bytes] = []

    def handler(conn, f):
        while (req := read_request(f)) is not None:
            seen.append(req[2])
            if len(seen) == 1:  # answer the first, so the connection goes back to the pool
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                continue
            time.sleep(KEEPALIVE_RACE_S * 2)  # works on it, then the connection drops unanswered
            return

    srv = RawServer(handler)

    async def go(up: Upstream) -> None:
        s = await up.open(srv.url + "/v1/completions", {"prompt": "warm"})
        await s.aread()
        await s.aclose()
        with pytest.raises(UpstreamError):
            await up.open(srv.url + "/v1/completions", {"prompt": "real"})

    try:
        run(_with(go))
        time.sleep(KEEPALIVE_RACE_S)  # a second copy would arrive on a fresh connection
        assert sum(b"real" in b for b in seen) == 1, seen
    finally:
        srv.close()


def test_connections_are_reused_and_expire_after_keepalive() -> None:
    def handler(conn, f):
        while read_request(f) is not None:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    srv = RawServer(handler)

    async def go(up: Upstream):
        out = []
        for _ in range(3):
            out.append(await up.post_json(srv.url + "/a", {}, 5))
        n_reused = srv.connections
        await asyncio.sleep(0.35)  # past keepalive_s: the idle connection is not reused
        out.append(await up.post_json(srv.url + "/a", {}, 5))
        return out, n_reused

    try:
        out, n_reused = run(_with(go, keepalive_s=0.3))
    finally:
        srv.close()
    assert [(s, t) for s, _, t in out] == [(200, "ok")] * 4
    assert n_reused == 1
    assert srv.connections == 2


def test_a_body_delimited_by_the_connection_closing_is_read_whole() -> None:
    def handler(conn, f):
        read_request(f)
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart one, ")
        time.sleep(0.05)
        conn.sendall(b"part two")

    srv = RawServer(handler)
    try:
        status, text = run(_with(lambda up: up.get_text(srv.url + "/metrics", 5)))
    finally:
        srv.close()
    assert (status, text) == (200, "part one, part two")


def test_closing_a_stream_early_drops_the_connection() -> None:
    """How the engine learns the client left: its side of the connection sees EOF."""
    eof_seen = threading.Event()

    def handler(conn, f):
        read_request(f)
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        conn.settimeout(5)
        if conn.recv(1) == b"":
            eof_seen.set()

    srv = RawServer(handler)

    async def go(up: Upstream):
        s = await up.open(srv.url + "/v1/completions", {})
        async for _ in s.aiter_raw():
            break
        await s.aclose()

    try:
        run(_with(go))
        assert eof_seen.wait(5)
    finally:
        srv.close()


def test_refused_connection_is_unreachable() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(Unreachable, match="cannot connect"):
        run(_with(lambda up: up.open(f"http://127.0.0.1:{port}/v1/completions", {})))


def test_an_answer_that_never_completes_times_out() -> None:
    def handler(conn, f):
        read_request(f)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        time.sleep(2)

    srv = RawServer(handler)

    async def go(up: Upstream):
        t0 = time.monotonic()
        with pytest.raises(UpstreamError, match="within 0.3 s"):
            await up.post_json(srv.url + "/slow", {}, 0.3)
        return time.monotonic() - t0

    try:
        took = run(_with(go))
    finally:
        srv.close()
    assert took < 1.5


def test_a_status_line_that_never_comes_times_out_and_the_server_sees_the_close() -> None:
    closed = threading.Event()

    def handler(conn, f):
        read_request(f)
        conn.settimeout(5)
        if conn.recv(1) == b"":
            closed.set()

    srv = RawServer(handler)
    try:
        with pytest.raises(UpstreamError, match="within 0.2 s"):
            run(_with(lambda up: up.open(srv.url + "/v1/completions", {}), request_s=0.2))
        assert closed.wait(5)
    finally:
        srv.close()


def test_a_reset_mid_body_is_an_upstream_error() -> None:
    def handler(conn, f):
        read_request(f)
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        time.sleep(0.05)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST

    srv = RawServer(handler)

    async def go(up: Upstream):
        s = await up.open(srv.url + "/v1/completions", {})
        got = []
        try:
            async for chunk in s.aiter_raw():
                got.append(chunk)
        finally:
            await s.aclose()
        return got

    try:
        with pytest.raises(UpstreamError, match="mid-answer"):
            run(_with(go))
    finally:
        srv.close()


def test_a_malformed_answer_is_an_upstream_error() -> None:
    def handler(conn, f):
        read_request(f)
        conn.sendall(b"SMTP ready\r\n\r\n")
        time.sleep(0.2)

    srv = RawServer(handler)
    try:
        with pytest.raises(UpstreamError, match="bad HTTP"):
            run(_with(lambda up: up.post_json(srv.url + "/x", {}, 5)))
    finally:
        srv.close()


def test_a_slow_reader_stops_the_router_reading_and_loses_nothing() -> None:
    """While the relay does not drain a stream, the router stops reading that connection, so a
    fast engine behind a slow client fills socket buffers, not the router's memory."""
    total = 64 << 20
    piece = 64 << 10
    data = bytes(range(256)) * (piece // 256)
    sent = [0]

    def handler(conn, f):
        read_request(f)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: " + str(total).encode() + b"\r\n\r\n")
        while sent[0] < total:
            conn.sendall(data)
            sent[0] += piece

    srv = RawServer(handler)

    async def go(up: Upstream):
        s = await up.open(srv.url + "/big", {})
        await asyncio.sleep(0.5)  # the relay is busy elsewhere
        sent_while_idle = sent[0]
        h, n, largest = hashlib.sha256(), 0, 0
        async for chunk in s.aiter_raw():
            h.update(chunk)
            n += len(chunk)
            largest = max(largest, len(chunk))
        await s.aclose()
        return sent_while_idle, n, h.hexdigest(), largest

    try:
        sent_while_idle, n, digest, largest = run(_with(go))
    finally:
        srv.close()
    assert n == total and digest == hashlib.sha256(data * (total // piece)).hexdigest()
    # Kernel buffers on both sides plus READ_HIGH_WATER, not the 64 MiB answer.
    assert sent_while_idle < 24 << 20, sent_while_idle
    assert largest < READ_HIGH_WATER + (8 << 20), largest


def _self_signed(tmp_path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 signed by itself, and its key (PEM files)."""
    x509 = pytest.importorskip("cryptography.x509")
    import datetime
    import ipaddress

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "prfaas test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_pem, key_pem = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_pem), str(key_pem)


def test_https_instances_are_verified_against_the_system_trust_store(tmp_path, monkeypatch) -> None:
    import ssl

    cert, key = _self_signed(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)

    def handler(conn, f):
        try:
            tls = ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            return  # the client refused our certificate
        f = tls.makefile("rb")
        while read_request(f) is not None:
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecure")

    srv = RawServer(handler)
    url = f"https://127.0.0.1:{srv.port}/health"
    try:
        # Unknown issuer: no connection, a clear error naming the certificate problem.
        with pytest.raises(Unreachable, match="CERTIFICATE_VERIFY_FAILED"):
            run(_with(lambda up: up.get_text(url, 5)))
        # Trusted (OpenSSL reads SSL_CERT_FILE when the default context loads its CAs).
        monkeypatch.setenv("SSL_CERT_FILE", cert)
        assert run(_with(lambda up: up.get_text(url, 5))) == (200, "secure")
    finally:
        srv.close()


def test_a_pooled_connection_closed_under_the_pool_is_not_used() -> None:
    """An instance killed while its connection sat in the pool: uvloop can have closed the
    transport before the protocol hears of it (connection_lost is a later callback), and the
    write then raises RuntimeError (seen once in bench/router_load.py's flapping soak). The
    request goes out on a fresh connection instead. The transport here is a stand-in that
    fails like that closed one."""

    def handler(conn, f):
        while read_request(f) is not None:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    srv = RawServer(handler)

    class ClosedUnderUs:
        def __init__(self, real) -> None:
            self.real = real

        def is_closing(self) -> bool:
            return False  # not yet visible, as in the race

        def write(self, data: bytes) -> None:
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")

        def close(self) -> None:
            self.real.close()

    async def go(up: Upstream):
        first = await up.post_json(srv.url + "/a", {}, 5)
        (conn,) = up._pool.idle[("http", "127.0.0.1", srv.port)]
        conn.transport = ClosedUnderUs(conn.transport)
        second = await up.post_json(srv.url + "/a", {}, 5)
        return first[0], second[0]

    try:
        assert run(_with(go)) == (200, 200)
        assert srv.connections == 2
    finally:
        srv.close()


def test_an_informational_answer_is_skipped_for_the_final_one() -> None:
    def handler(conn, f):
        while read_request(f) is not None:
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            time.sleep(0.05)
            conn.sendall(
                b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Final: yes\r\n\r\nfinal"
            )

    srv = RawServer(handler)

    async def go(up: Upstream):
        out = []
        for _ in range(2):  # and the connection is reused cleanly after it
            s = await up.open(srv.url + "/v1/completions", {})
            out.append((s.status_code, s.headers.get("x-final"), s.headers.get("link"), await s.aread()))
            await s.aclose()
        return out

    try:
        assert run(_with(go)) == [(200, "yes", None, b"final")] * 2
        assert srv.connections == 1
    finally:
        srv.close()


def _unanswered_port() -> tuple[socket.socket, socket.socket, int]:
    """A port whose connections hang: its listen backlog is full and nobody accepts."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    port = lsock.getsockname()[1]
    filler = socket.socket()
    filler.settimeout(2)
    filler.connect(("127.0.0.1", port))  # takes the one backlog place
    return lsock, filler, port


def test_a_connection_that_never_completes_is_unreachable_after_connect_s() -> None:
    lsock, filler, port = _unanswered_port()

    async def go(up: Upstream):
        t0 = time.monotonic()
        with pytest.raises(Unreachable, match="within 0.3 s"):
            await up.open(f"http://127.0.0.1:{port}/v1/completions", {})
        return time.monotonic() - t0

    try:
        took = run(_with(go, connect_s=0.3))
    finally:
        filler.close()
        lsock.close()
    assert took < 2


def test_cancelling_a_request_while_it_connects_cancels_it_at_once() -> None:
    """The client left while the router was still connecting: nothing is sent later."""
    lsock, filler, port = _unanswered_port()

    async def go(up: Upstream):
        task = asyncio.create_task(up.open(f"http://127.0.0.1:{port}/v1/completions", {}))
        await asyncio.sleep(0.1)
        task.cancel()
        t0 = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - t0

    try:
        took = run(_with(go, connect_s=5))
    finally:
        filler.close()
        lsock.close()
    assert took < 1


def test_a_whole_answer_cut_short_leaves_no_request_counted_open(tmp_path) -> None:
    """Through the router: a non-streamed answer whose body breaks off is a 502 for the client,
    and the instance's open-request count (which placement reads) goes back to 0."""
    from router_helpers import RunningRouter, build_tokenizer

    from prfaas_plugin.router.config import RouterConfig
    from prfaas_plugin.router.tokenize import PromptTokenizer

    def handler(conn, f):
        while (req := read_request(f)) is not None:
            if req[0].startswith(b"GET /health"):
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                continue
            conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"id"')
            time.sleep(0.05)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
            return

    srv = RawServer(handler)
    cfg = RouterConfig.model_validate(
        {
            "model": "tiny",
            "tokenizer": "/unused",
            "block_size": 4,
            "clusters": [
                {"name": "local", "kind": "local", "both": [{"url": srv.url, "kv_endpoint": "127.0.0.1:15600"}]}
            ],
            "threshold": {"mode": "fixed", "tokens": 40},
            "timeouts": {"health_every_s": 60},
        }
    )
    r = RunningRouter(cfg, PromptTokenizer(str(build_tokenizer(tmp_path / "tok"))))
    try:
        resp = r.post("/v1/completions", {"model": "tiny", "prompt": "a b c", "max_tokens": 2})
        assert resp.status_code == 502, resp.text
        assert [i.inflight for i in r.router.fleet.instances] == [0]
    finally:
        r.stop()
        srv.close()
