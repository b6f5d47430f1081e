"""The demo's process supervisor: health waits, failure messages, and nothing left running."""

from __future__ import annotations

import os
import sys
import textwrap
import time

import pytest

from prfaas_plugin.demo.ports import free_port as _free_port
from prfaas_plugin.demo.supervisor import ProcessFailed, Supervisor

# A parent that spawns a grandchild and an HTTP server, like vLLM's API server + EngineCore.
_TREE = textwrap.dedent(
    """
    import http.server, subprocess, sys, threading
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print("grandchild", child.pid, flush=True)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
        def log_message(self, *a): pass
    srv = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H)
    srv.serve_forever()
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("own_sessions", [True, False])
def test_stop_all_kills_the_whole_process_tree(tmp_path, own_sessions) -> None:
    port = _free_port()
    with Supervisor(tmp_path, own_sessions=own_sessions) as sup:
        child = sup.start("tree", [sys.executable, "-c", _TREE, str(port)])
        waited = sup.wait_healthy("tree", f"http://127.0.0.1:{port}/", timeout_s=30)
        assert waited >= 0
        assert os.getpgid(child.popen.pid) == child.popen.pid  # its own group either way
        assert (os.getsid(child.popen.pid) == os.getsid(0)) is not own_sessions
        grandchild = int(child.log_path.read_text().split()[1])
        assert _alive(child.popen.pid) and _alive(grandchild)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(grandchild):
        time.sleep(0.1)
    assert not _alive(child.popen.pid)
    assert not _alive(grandchild)


def test_a_process_that_dies_fails_fast_with_its_log(tmp_path) -> None:
    with Supervisor(tmp_path) as sup:
        sup.start("broken", [sys.executable, "-c", "print('boom: bad flag'); raise SystemExit(3)"])
        t0 = time.monotonic()
        with pytest.raises(ProcessFailed, match="boom: bad flag") as info:
            sup.wait_healthy("broken", f"http://127.0.0.1:{_free_port()}/", timeout_s=60)
        assert "status 3" in str(info.value)
        assert time.monotonic() - t0 < 20


def test_failure_shows_the_first_error_not_only_the_tail(tmp_path) -> None:
    """vLLM's API server ends its log with 'See root cause above' hundreds of lines after the
    engine core's real error; the message must carry that first error."""
    script = (
        "import sys\n"
        "print('starting'); print('ERROR worker.py: OSError: [Errno 98] Address already in use')\n"
        "for i in range(200): print('noise', i)\n"
        "print('RuntimeError: Engine core initialization failed. See root cause above.')\n"
        "sys.exit(1)\n"
    )
    with Supervisor(tmp_path) as sup:
        sup.start("engine", [sys.executable, "-c", script])
        with pytest.raises(ProcessFailed) as info:
            sup.wait_healthy("engine", f"http://127.0.0.1:{_free_port()}/", timeout_s=60)
    text = str(info.value)
    assert "Address already in use" in text and "See root cause above" in text
    assert "noise 100" not in text


def test_free_ports_avoid_the_kernels_ephemeral_range() -> None:
    from prfaas_plugin.demo.ports import ephemeral_range, free_port

    lo, hi = ephemeral_range()
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == 20
    if lo > 20100:
        assert all(p < lo for p in ports)


def test_cleanups_run_after_processes_even_on_interrupt(tmp_path) -> None:
    ran: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        with Supervisor(tmp_path) as sup:
            sup.add_cleanup(lambda: ran.append("netns"))
            sup.start("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"])
            raise KeyboardInterrupt
    assert ran == ["netns"]


def test_duplicate_names_are_refused(tmp_path) -> None:
    with Supervisor(tmp_path) as sup:
        sup.start("a", [sys.executable, "-c", "import time; time.sleep(600)"])
        with pytest.raises(ValueError, match="already supervised"):
            sup.start("a", [sys.executable, "-c", "pass"])
