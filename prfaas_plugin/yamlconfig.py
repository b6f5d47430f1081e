"""Reading a YAML config file into a validated pydantic model, with errors that name the file
and every offending field (shared by the planner and the router)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def read_text(path: Path, error: type[Exception]) -> str:
    """The file's UTF-8 text; a missing file, a folder, unreadable or non-UTF-8 bytes raise
    ``error`` with a one-line message naming the path (the CLI prints it, no traceback)."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a file") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (bad byte at offset {exc.start})") from None
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a finite number")


def loads_finite_json(text: str) -> Any:
    """``json.loads`` for files people write (model configs, traces): NaN and Infinity, which
    Python's parser takes by default, are a ValueError like any other bad JSON."""
    return json.loads(text, parse_constant=_refuse_constant)


def read_yaml_mapping(path: Path, error: type[Exception]) -> dict[str, Any]:
    text = read_text(path, error)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: the top level must be a mapping")
    return raw


def validate(model: type[M], raw: dict[str, Any], path: Path, what: str, error: type[Exception]) -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{'.'.join(str(x) for x in e['loc']) or '<top>'}: {e['msg']}" for e in exc.errors()]
        raise error(f"{path}: invalid {what}:\n  " + "\n  ".join(lines)) from None


def load_yaml_model(
    path: str | Path,
    model: type[M],
    what: str,
    error: type[Exception],
    edit: Callable[[dict[str, Any]], None] | None = None,
) -> M:
    """``edit`` may change the raw mapping before validation (e.g. apply overrides)."""
    p = Path(path)
    raw = read_yaml_mapping(p, error)
    if edit is not None:
        edit(raw)
    return validate(model, raw, p, what, error)
