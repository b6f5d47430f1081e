"""`prfaas simulate`: the paper's deployments in a discrete-event simulation (docs/simulator.md)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from prfaas_plugin.cli.outputs import output_dir
from prfaas_plugin.planner.config import PlannerConfigError
from prfaas_plugin.sim.config import SimConfigError, load_simulation


def _override(values: tuple[str, ...]) -> dict:
    from prfaas_plugin.cli.plan import yaml_value

    out = {}
    for v in values:
        if "=" not in v:
            raise click.BadParameter(f"{v!r}: expected KEY=VALUE", param_hint="--set")
        k, val = v.split("=", 1)
        out[k] = yaml_value(val, "--set")
    return out


@click.command(name="simulate")
@click.argument("config", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("out/simulate"),
    show_default=True,
    help="Folder for summary.json and the PNG plots.",
)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a key of the config (dotted, e.g. simulation.arrivals.rate=3); repeatable.",
)
@click.option("--no-plots", is_flag=True, help="Write summary.json only.")
@click.option("--progress/--no-progress", default=True, help="Progress bar on stderr.")
def command(config: Path, out: Path, sets: tuple[str, ...], no_plots: bool, progress: bool) -> None:
    """Simulate CONFIG (a `prfaas plan` YAML with a `simulation:` section)."""
    from prfaas_plugin.sim.run import run_all, summary_table, to_json, write_json, write_plots

    overrides = _override(sets)
    try:
        cfg, sim, base = load_simulation(config, overrides)
        output_dir(out, "--out")  # before the run: a bad folder must not cost a finished simulation
        t0 = time.perf_counter()
        result, runs = run_all(cfg, sim, base, progress=progress)
    except (SimConfigError, PlannerConfigError) as exc:
        raise click.ClickException(str(exc)) from None
    wall = time.perf_counter() - t0
    click.echo(summary_table(result, runs, sim.arrivals.rate if sim.arrivals.kind != "trace" else None))
    click.echo(
        f"\n{sim.duration_s:g} simulated s per deployment (first {sim.warmup_s:g} s warm-up), "
        f"{len(runs)} deployments in {wall:.1f} s wall"
    )
    data = to_json(result, runs, sim)
    data["wall_s"] = wall
    write_json(data, out / "summary.json")
    if not no_plots:
        for p in write_plots(runs, sim, out):
            click.echo(f"wrote {p}")
    click.echo(f"wrote {out / 'summary.json'}")
