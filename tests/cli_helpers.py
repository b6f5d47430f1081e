"""A command that must refuse its input: a non-zero exit, an error naming what is wrong, and no
Python exception behind it (click's own exit, not a traceback)."""

from __future__ import annotations

from typing import Any

from click.testing import CliRunner


def cli_fails(command: Any, args: list[str], *needles: str) -> str:
    res = CliRunner().invoke(command, args)
    assert res.exit_code != 0, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    for needle in needles:
        assert needle in res.output, res.output
    return res.output
