"""What every benchmark shares: a description of the machine and the BENCHMARKS.md entry."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def machine() -> str:
    """CPU model, cores and memory: absolute figures only mean something next to this."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = 0.0
    try:
        with open("/proc/meminfo") as f:
            mem_gib = int(f.readline().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    try:
        load = f" load {os.getloadavg()[0]:.1f}"
    except OSError:
        load = ""
    return f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, Python {platform.python_version()}{load}"


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def append_benchmarks(title: str, body: str, notes: str = "") -> None:
    """Append one dated entry (figures, machine, date, command) to BENCHMARKS.md."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    entry = [f"\n## {title}\n", f"- date: {stamp}", f"- machine: {machine()}", f"- command: `{command_line()}`"]
    if notes:
        entry.append(f"- notes: {notes}")
    entry += ["", body.rstrip(), ""]
    with open(ROOT / "BENCHMARKS.md", "a") as f:
        f.write("\n".join(entry) + "\n")
