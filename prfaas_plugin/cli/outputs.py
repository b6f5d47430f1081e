"""Checking where a command will write before it does the work, so a bad path is a one-line
error up front and never loses a finished run's results."""

from __future__ import annotations

import os
from pathlib import Path

import click


def output_dir(path: Path, option: str) -> Path:
    """Create ``path`` (and its parents) as a writable folder, or fail naming ``option``."""
    if path.exists() and not path.is_dir():
        raise click.BadParameter(f"{path} exists and is not a directory", param_hint=option)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.BadParameter(f"cannot create directory {path} ({exc.strerror or exc})", param_hint=option) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise click.BadParameter(f"directory {path} is not writable", param_hint=option)
    return path


def output_file(path: Path, option: str) -> Path:
    """``path`` must name a file in an existing, writable folder (nothing is created)."""
    parent = path.parent
    if path.is_dir():
        raise click.BadParameter(f"{path} is a directory", param_hint=option)
    if not parent.is_dir():
        raise click.BadParameter(f"directory {parent} does not exist", param_hint=option)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise click.BadParameter(f"directory {parent} is not writable", param_hint=option)
    return path


def write_text(path: Path, text: str, option: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise click.ClickException(f"{option}: cannot write {path} ({exc.strerror or exc})") from None
