"""The ``prfaas`` command line.

Subcommands are imported only when invoked, so ``prfaas plan`` does not pay for importing the
router's HTTP stack or torch. Each feature registers its command in ``_COMMANDS`` below as
``name -> "module:attribute"``; the module owns its options and help text.
"""

from __future__ import annotations

import importlib

import click

from prfaas_plugin import __version__

_COMMANDS: dict[str, tuple[str, str]] = {
    "kv-size": ("prfaas_plugin.cli.kv_size", "Per-token and fixed KV bytes of a model, and its KV throughput."),
    "plan": ("prfaas_plugin.cli.plan", "Threshold, P/D split and throughput from the PrfaaS model (Eqs. 1-8)."),
    "router": ("prfaas_plugin.cli.router", "Run the PrfaaS global router (OpenAI-compatible HTTP front)."),
    "simulate": ("prfaas_plugin.cli.simulate", "Discrete-event simulation of the deployments (TTFT, egress, bursts)."),
    "demo": ("prfaas_plugin.cli.demo", "Run the whole PrfaaS deployment locally on CPU."),
    "bench": ("prfaas_plugin.cli.bench", "Run a benchmark from bench/ and append it to BENCHMARKS.md."),
    "vllm-cli": ("prfaas_plugin.cli.vllm_cli", "Install or remove the `vllm serve --kv-connector` sugar."),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in _COMMANDS:
            return None
        module_name, _help = _COMMANDS[cmd_name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                # The command is declared but this build does not ship it yet.
                return _unavailable(cmd_name)
            raise
        return module.command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Show one-line help without importing every command module.
        rows = [(name, help_) for name, (_m, help_) in sorted(_COMMANDS.items())]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _unavailable(name: str) -> click.Command:
    @click.command(name=name, context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def _cmd(args: tuple[str, ...]) -> None:
        raise click.ClickException(f"`prfaas {name}` is not available in this build")

    return _cmd


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="prfaas")
def main() -> None:
    """Prefill-as-a-Service: plan, route and serve cross-datacenter prefill/decode."""


if __name__ == "__main__":  # pragma: no cover
    main()
