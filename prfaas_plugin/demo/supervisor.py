"""Starting, watching and reliably stopping the demo's processes.

Every child runs in its own session (or only its own process group, ``own_sessions=False``)
so stopping it also stops what it spawned
(vLLM's EngineCore and worker processes); stop() escalates SIGTERM -> SIGKILL. The supervisor
also stops everything on SIGINT/SIGTERM, so Ctrl-C never leaves a server behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

_ERROR_MARK = re.compile(r"Traceback \(most recent call last\)|\bERROR\b|\b[A-Za-z]*Error: ")


class ProcessFailed(RuntimeError):
    """A supervised process exited or never became healthy; the message has its log tail."""


@dataclass
class Supervised:
    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]
    started_at: float = field(default_factory=time.monotonic)

    def failure_report(self, first: int = 40, last: int = 30) -> str:
        """What to show when the process failed: the *first* error block of its log (vLLM's
        engine core prints the root cause long before the API server's last lines, which only
        say "Engine core initialization failed. See root cause above"), then the log's tail."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "<no log>"
        start = next((i for i, line in enumerate(lines) if _ERROR_MARK.search(line)), None)
        if start is None or start >= len(lines) - last:
            return "\n".join(lines[-last:])
        head = lines[max(0, start - 2) : start + first]
        return "\n".join(["--- first error ---", *head, "--- log tail ---", *lines[-last:]])


class Supervisor:
    """``own_sessions=False`` starts each child in its own process group but in the supervisor's
    session: Linux's autogroup scheduler (processes in the root cgroup) then shares the CPUs
    between the children's threads, not between sessions. Tests that overlap servers on the same
    cores need that: a server in another session whose threads busy-poll keeps most of a core
    from a tensor-parallel peer's rank there (measured: a TP-2 prefill took 2 minutes instead of
    1 s next to a waiting decode instance)."""

    def __init__(self, log_dir: Path, own_sessions: bool = True) -> None:
        self.log_dir = Path(log_dir)
        self.own_sessions = own_sessions
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.children: dict[str, Supervised] = {}
        self._old_handlers: dict[int, object] = {}
        self._cleanups: list[Callable[[], None]] = []

    # -- context / signals ----------------------------------------------------------------------
    def __enter__(self) -> Supervisor:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._old_handlers.clear()

    def _on_signal(self, signum: int, _frame: object) -> None:
        # Turn SIGTERM into the same path as Ctrl-C: unwind through __exit__ and clean up.
        raise KeyboardInterrupt(f"signal {signum}")

    def add_cleanup(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` after every process stopped (e.g. delete network namespaces)."""
        self._cleanups.append(fn)

    # -- processes ------------------------------------------------------------------------------
    def start(
        self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> Supervised:
        if name in self.children:
            raise ValueError(f"a process named {name!r} is already supervised")
        log_path = self.log_dir / f"{name}.log"
        log = open(log_path, "wb")
        try:
            popen = subprocess.Popen(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                cwd=cwd,
                start_new_session=self.own_sessions,
                process_group=None if self.own_sessions else 0,
            )
        finally:
            log.close()
        child = Supervised(name, list(argv), log_path, popen)
        self.children[name] = child
        return child

    def wait_healthy(self, name: str, url: str, timeout_s: float) -> float:
        """Poll ``url`` until it answers 200; returns seconds waited. Fails fast with the log
        tail if the process dies first."""
        child = self.children[name]
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if child.popen.poll() is not None:
                    raise ProcessFailed(
                        f"{name} exited with status {child.popen.returncode} before it was "
                        f"healthy; last log lines:\n{child.failure_report()}"
                    )
                try:
                    if client.get(url).status_code == 200:
                        return time.monotonic() - child.started_at
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        raise ProcessFailed(
            f"{name} was not healthy at {url} after {timeout_s:.0f} s; last log lines:\n{child.failure_report()}"
        )

    def check_alive(self) -> None:
        for child in self.children.values():
            if child.popen.poll() is not None:
                raise ProcessFailed(
                    f"{child.name} exited with status {child.popen.returncode}; last log "
                    f"lines:\n{child.failure_report()}"
                )

    def stop(self, name: str, grace_s: float = 10.0) -> None:
        child = self.children.pop(name, None)
        if child is None:
            return
        _stop_group(child.popen, grace_s)

    def stop_all(self, grace_s: float = 10.0) -> None:
        for name in list(self.children):
            self.stop(name, grace_s)
        while self._cleanups:
            fn = self._cleanups.pop()
            try:
                fn()
            except Exception:  # cleanup must go on for the others
                pass


def _stop_group(popen: subprocess.Popen[bytes], grace_s: float) -> None:
    if popen.poll() is not None:
        _kill_group(popen.pid, signal.SIGKILL)  # reap stragglers the leader left behind
        return
    _kill_group(popen.pid, signal.SIGTERM)
    try:
        popen.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    _kill_group(popen.pid, signal.SIGKILL)
    try:
        popen.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
