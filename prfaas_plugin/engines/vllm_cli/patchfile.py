"""Read a prfaas patch file and apply or reverse it, exactly, on one text.

A patch file is a comment header followed by an ordinary unified diff of one file, so it also
works with ``patch -p1`` or ``git apply`` by hand. The header documents the patch for people and
carries three machine-read fields::

    # prfaas-id: kv-connector-sugar
    # prfaas-default: yes
    # prfaas-tested: 0.32.0 <sha256 of the original file> <sha256 of the patched file>

The hashes are what makes applying safe: the file is changed only if it is byte-for-byte the file
the patch was tested on, and the result must be byte-for-byte the file that was tested. Applying
here is therefore strict (every hunk must match at its stated line, no fuzz), and is written by
hand instead of calling ``patch``, which CI machines and user images do not always have.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

_HUNK_RE = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
_FIELD_RE = re.compile(r"^# prfaas-([a-z]+):\s*(.*?)\s*$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class PatchFormatError(ValueError):
    """The patch file itself is malformed."""


class PatchMismatchError(RuntimeError):
    """The text does not contain what a hunk expects (it is not the file the patch was made for)."""


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Tested:
    """One vLLM version the patch was tested on, with the target file before and after."""

    version: str
    original_sha256: str
    patched_sha256: str


@dataclass(frozen=True)
class Hunk:
    old_start: int  # 1-based line number in the original file
    new_start: int  # 1-based line number in the patched file
    old_lines: tuple[str, ...]  # context and removed lines, each ending in "\n"
    new_lines: tuple[str, ...]  # context and added lines


@dataclass(frozen=True)
class PatchFile:
    path: Path
    patch_id: str
    default: bool
    target: str  # path inside site-packages, e.g. vllm/entrypoints/launchers/cli_args.py
    tested: tuple[Tested, ...]
    header: str  # the comment header, for `prfaas vllm-cli status --verbose`
    hunks: tuple[Hunk, ...]

    @property
    def tested_versions(self) -> tuple[str, ...]:
        return tuple(t.version for t in self.tested)

    def tested_for(self, version: str) -> Tested | None:
        for tested in self.tested:
            if tested.version == version:
                return tested
        return None

    def apply(self, text: str) -> str:
        """The patched text; raises PatchMismatchError when a hunk does not match exactly."""
        return _apply(text, [(h.old_start, h.old_lines, h.new_lines) for h in self.hunks], self.target)

    def reverse(self, text: str) -> str:
        """The original text from a patched one; raises PatchMismatchError like apply()."""
        return _apply(text, [(h.new_start, h.new_lines, h.old_lines) for h in self.hunks], self.target)


def _apply(text: str, hunks: list[tuple[int, tuple[str, ...], tuple[str, ...]]], target: str) -> str:
    lines = text.splitlines(keepends=True)
    offset = 0
    for number, (start, expect, replace) in enumerate(hunks, 1):
        at = start - 1 + offset
        if lines[at : at + len(expect)] != list(expect):
            raise PatchMismatchError(f"{target}: hunk {number} does not match at line {start}")
        lines[at : at + len(expect)] = replace
        offset += len(replace) - len(expect)
    return "".join(lines)


def load_patch(path: Path) -> PatchFile:
    """Parse a patch file; every format problem is reported with the file name and line."""
    raw = path.read_text(encoding="utf-8")
    lines = raw.splitlines(keepends=True)
    fields: dict[str, list[str]] = {}
    header: list[str] = []
    index = 0
    while index < len(lines) and not lines[index].startswith("--- "):
        line = lines[index]
        if line.strip() and not line.startswith("#"):
            raise PatchFormatError(f"{path}:{index + 1}: header lines must start with '#'")
        header.append(line)
        match = _FIELD_RE.match(line)
        if match:
            fields.setdefault(match.group(1), []).append(match.group(2))
        index += 1
    if index + 1 >= len(lines) or not lines[index + 1].startswith("+++ "):
        raise PatchFormatError(f"{path}: no '--- a/FILE' / '+++ b/FILE' diff after the header")
    old_name = lines[index][4:].strip().split("\t")[0]
    new_name = lines[index + 1][4:].strip().split("\t")[0]
    if not (old_name.startswith("a/") and new_name.startswith("b/") and old_name[2:] == new_name[2:]):
        raise PatchFormatError(f"{path}:{index + 1}: expected '--- a/FILE' and '+++ b/FILE' of one file")
    target = old_name[2:]
    hunks = _parse_hunks(path, lines, index + 2)

    def one(name: str) -> str:
        values = fields.get(name, [])
        if len(values) != 1:
            raise PatchFormatError(f"{path}: header needs exactly one '# prfaas-{name}:' line")
        return values[0]

    default = one("default")
    if default not in ("yes", "no"):
        raise PatchFormatError(f"{path}: prfaas-default must be yes or no, got {default!r}")
    tested = []
    for value in fields.get("tested", []):
        parts = value.split()
        if len(parts) != 3 or not all(_SHA_RE.match(p) for p in parts[1:]):
            raise PatchFormatError(f"{path}: prfaas-tested must be 'VERSION SHA256 SHA256', got {value!r}")
        tested.append(Tested(parts[0], parts[1], parts[2]))
    if not tested:
        raise PatchFormatError(f"{path}: header has no '# prfaas-tested:' line")
    return PatchFile(
        path=path,
        patch_id=one("id"),
        default=default == "yes",
        target=target,
        tested=tuple(tested),
        header="".join(header),
        hunks=hunks,
    )


def _parse_hunks(path: Path, lines: list[str], index: int) -> tuple[Hunk, ...]:
    hunks: list[Hunk] = []
    while index < len(lines):
        match = _HUNK_RE.match(lines[index])
        if not match:
            if lines[index].startswith("--- "):
                raise PatchFormatError(f"{path}:{index + 1}: a patch file must change exactly one file")
            raise PatchFormatError(f"{path}:{index + 1}: expected a '@@ -a,b +c,d @@' hunk header")
        old_start, old_count = int(match.group(1)), int(match.group(2) or 1)
        new_start, new_count = int(match.group(3)), int(match.group(4) or 1)
        old: list[str] = []
        new: list[str] = []
        index += 1
        while index < len(lines) and (len(old) < old_count or len(new) < new_count):
            line = lines[index]
            body = line[1:] if line != "\n" else "\n"  # some editors strip the space of blank context
            kind = line[0] if line != "\n" else " "
            if kind == " ":
                old.append(body)
                new.append(body)
            elif kind == "-":
                old.append(body)
            elif kind == "+":
                new.append(body)
            else:
                raise PatchFormatError(f"{path}:{index + 1}: unexpected line in hunk: {line!r}")
            index += 1
        if (len(old), len(new)) != (old_count, new_count):
            raise PatchFormatError(f"{path}: hunk at line {old_start} is shorter than its header says")
        hunks.append(Hunk(old_start, new_start, tuple(old), tuple(new)))
    if not hunks:
        raise PatchFormatError(f"{path}: the diff has no hunks")
    return tuple(hunks)
