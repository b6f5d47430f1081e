"""`prfaas bench NAME [ARGS...]`: run one of the benchmarks under the repository's bench/ folder.

Benchmarks live in bench/ (not in the wheel) because they need a source checkout to append to
BENCHMARKS.md; this command only finds and runs them with the current interpreter.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click


def bench_dir() -> Path | None:
    candidate = Path(__file__).resolve().parents[2] / "bench"
    return candidate if candidate.is_dir() else None


def available() -> list[str]:
    d = bench_dir()
    return sorted(p.stem for p in d.glob("*.py") if not p.name.startswith("_")) if d else []


@click.command(name="bench", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("name", required=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def command(name: str | None, args: tuple[str, ...]) -> None:
    """Run benchmark NAME (e.g. `prfaas bench transfer --quick --json`); without NAME, list them."""
    d = bench_dir()
    if d is None:
        raise click.ClickException("benchmarks need a source checkout of prfaas-plugin (bench/ was not found)")
    names = available()
    if name is None:
        click.echo("\n".join(names) if names else "no benchmarks found")
        return
    if name not in names:
        raise click.ClickException(f"unknown benchmark {name!r}; available: {', '.join(names) or 'none'}")
    rc = subprocess.call([sys.executable, str(d / f"{name}.py"), *args], cwd=d.parent)
    sys.exit(rc)
