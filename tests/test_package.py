"""The package foundation: console script, lazy subcommands, kernels mapping."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

import prfaas_plugin
from prfaas_plugin.cli import _COMMANDS, main


def test_version_matches_package() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert prfaas_plugin.__version__ in result.output


def test_help_lists_every_command_without_importing_them() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in _COMMANDS:
        assert name in result.output


def test_unknown_command_is_an_error() -> None:
    result = CliRunner().invoke(main, ["no-such-command"])
    assert result.exit_code != 0
    assert "No such command" in result.output


def test_kernels_subpackage_resolves_to_top_level_folder() -> None:
    import prfaas_plugin.kernels as kernels

    assert kernels.__file__ is not None
    assert kernels.__file__.replace("\\", "/").endswith("kernels/__init__.py")


def test_module_entry_point_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "prfaas_plugin", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "plan" in out.stdout


def test_bench_command_lists_and_refuses_unknown(tmp_path) -> None:
    from prfaas_plugin.cli import bench

    result = CliRunner().invoke(main, ["bench", "definitely-not-a-bench"])
    assert result.exit_code != 0
    assert "unknown benchmark" in result.output
    listed = CliRunner().invoke(main, ["bench"])
    assert listed.exit_code == 0
    assert listed.output.strip().splitlines() == (bench.available() or ["no benchmarks found"])


def test_wheel_holds_every_package_and_builds_without_setuptools_warnings(tmp_path) -> None:
    """Packages are found, not listed: a new subpackage lands in the wheel, and setuptools has
    nothing to warn about (a data folder it would not ship, a deprecated setting)."""
    import shutil
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"  # build from a copy: an in-tree build/ would keep stale modules for later wheels
    shutil.copytree(
        root,
        src,
        ignore=shutil.ignore_patterns(
            ".venv*", ".git", "build", "out", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis"
        ),
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-v",
            "-w",
            str(tmp_path),
            str(src),
        ],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0 and "No module named" in out.stderr and "setuptools" in out.stderr:
        import pytest

        pytest.skip("setuptools not available for an offline wheel build")
    assert out.returncode == 0, out.stderr[-2000:]
    names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
    assert "prfaas_plugin/kernels/__init__.py" in names
    assert any(n.endswith(".patch") for n in names)
    assert "prfaas_plugin/planner/search.py" in names
    packages = {str(p.relative_to(root)) for p in (root / "prfaas_plugin").rglob("__init__.py")}
    assert packages - set(names) == set()
    log = out.stdout + out.stderr
    for warning in ("importable package", "would be ignored", "SetuptoolsDeprecationWarning", "is deprecated"):
        assert warning not in log, log[log.index(warning) - 500 : log.index(warning) + 500]
