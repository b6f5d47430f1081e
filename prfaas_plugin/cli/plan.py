"""`prfaas plan`: threshold, P/D split, throughput and egress from the PrfaaS model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click
import yaml

from prfaas_plugin.cli.outputs import output_dir, output_file, write_text
from prfaas_plugin.planner.config import PlannerConfigError, load_config
from prfaas_plugin.planner.search import PlanResult


def _run(config: Path, overrides: dict | None = None, with_curves: bool = False) -> PlanResult:
    cfg, base = load_config(config, overrides)
    return cfg.plan(base, with_curves=with_curves)


def yaml_value(text: str, option: str) -> object:
    """One command-line value read as YAML (so 3 is a number and [1, 2] a list)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise click.BadParameter(f"{text!r} is not a valid YAML value ({first})", param_hint=option) from None


def _json(data: object) -> str:
    """JSON with no NaN (not JSON): an undefined mean (l_long when nothing is offloaded, l_short
    when everything is) is null."""

    def clean(x: object) -> object:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(data), indent=2, allow_nan=False)


def summary_table(r: PlanResult) -> str:
    d = r.to_dict()
    h, n = d["baselines"]["homogeneous"], d["baselines"]["naive_heterogeneous"]
    lines = [
        f"optimal threshold t        {d['threshold_tokens'] / 1000:8.2f} K tokens",
        f"offloaded fraction p       {d['offload_fraction'] * 100:8.1f} %   (l_long {d['l_long'] / 1000:.1f}K, "
        f"l_short {d['l_short'] / 1000:.1f}K, mean {d['mean_length'] / 1000:.1f}K)",
        f"instances PrfaaS/P/D       {d['n_prfaas']:>4} / {d['n_pd_prefill']} / {d['n_pd_decode']}",
        f"Theta prfaas / pd-p / pd-d {d['theta_prfaas']:8.2f} / {d['theta_pd_prefill']:.2f} / {d['theta_pd_decode']:.2f} req/s"
        f"   (PrfaaS is {d['prfaas_bound']}-bound)",
        f"Lambda_max                 {d['lambda_max']:8.2f} req/s",
        f"egress                     {d['egress_gbps']:8.2f} Gbit/s of {d['link_gbps']:g} ({d['link_utilisation'] * 100:.1f} %)",
        "",
        f"{'deployment':<24}{'Lambda_max':>11}{'split P/D':>11}{'ratio':>8}",
        f"{'PrfaaS-PD':<24}{d['lambda_max']:>11.2f}{str(d['n_pd_prefill']) + '/' + str(d['n_pd_decode']):>11}"
        f"{d['ratios']['vs_homogeneous']:>7.2f}x",
        f"{'homogeneous PD':<24}{h['lambda_max']:>11.2f}{str(h['n_prefill']) + '/' + str(h['n_decode']):>11}{1.0:>7.2f}x",
        f"{'naive heterogeneous':<24}{n['lambda_max']:>11.2f}{str(n['n_prefill']) + '/' + str(n['n_decode']):>11}"
        f"{d['ratios']['naive_vs_homogeneous']:>7.2f}x",
    ]
    if "cost_normalised_vs_homogeneous" in d["ratios"]:
        lines.append(f"cost-normalised vs homogeneous: {d['ratios']['cost_normalised_vs_homogeneous']:.2f}x")
    return "\n".join(lines)


def plan_values(r: PlanResult) -> str:
    """The plan's instance counts as the kustomize values object that deploy/overlays/*/values/
    reads (plan.yaml there): kustomize copies each count into its StatefulSet's replicas."""
    d = r.to_dict()
    return (
        "# Written by `prfaas plan --config planner.yaml --emit-values plan.yaml`: the instance counts of\n"
        "# the plan (docs/planner.md). Re-run it when the profiles or the workload change.\n"
        + yaml.safe_dump(
            {
                "apiVersion": "prfaas.local/v1alpha1",
                "kind": "PlanValues",
                "metadata": {"name": "plan", "annotations": {"config.kubernetes.io/local-config": "true"}},
                "spec": {
                    "replicas": {
                        "prfaasPrefill": int(d["n_prfaas"]),
                        "pdPrefill": int(d["n_pd_prefill"]),
                        "pdDecode": int(d["n_pd_decode"]),
                    },
                    "thresholdTokens": int(round(d["threshold_tokens"])),
                },
            },
            sort_keys=False,
        )
    )


def _parse_sweep(spec: str) -> tuple[str, list]:
    key, sep, values = spec.partition("=")
    if not sep or not key or not values:
        raise click.BadParameter(f"expected KEY=V1,V2,..., got {spec!r}", param_hint="--sweep")
    return key, [yaml_value(v, "--sweep") for v in values.split(",")]


@click.command(name="plan")
@click.option("--config", "config", type=click.Path(path_type=Path), required=True, help="planner YAML")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of the table")
@click.option(
    "--plot", "plot_dir", type=click.Path(path_type=Path), default=None, help="write Fig. 5-style PNGs into this folder"
)
@click.option(
    "--sweep",
    default=None,
    metavar="KEY=V1,V2,...",
    help="re-plan for each value of one config key (e.g. profiles.h20.compute_ratio=2.5,3.1)",
)
@click.option(
    "--emit-values",
    "values_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="also write the instance counts as deploy values (deploy/overlays/*/values/plan.yaml)",
)
def command(config: Path, as_json: bool, plot_dir: Path | None, sweep: str | None, values_file: Path | None) -> None:
    """Optimal threshold t, P/D split, per-stage throughput, Lambda_max and egress (paper Eqs. 1-8),
    with the homogeneous and naive heterogeneous baselines."""
    if sweep and values_file is not None:
        raise click.UsageError("--emit-values writes one plan's counts; it cannot be used with --sweep")
    if values_file is not None:
        output_file(values_file, "--emit-values")
    if plot_dir is not None:
        output_dir(plot_dir, "--plot")
    try:
        if sweep:
            key, values = _parse_sweep(sweep)
            rows = [{"value": v, **_run(config, {key: v}).to_dict()} for v in values]
            if as_json:
                click.echo(_json({"sweep": key, "results": rows}))
                return
            click.echo(
                f"{key:>28} {'t (K)':>7} {'p %':>6} {'P/D':>5} {'Lambda':>7} {'homog.':>7} {'naive':>7} "
                f"{'ratio':>6} {'egress':>7}"
            )
            for r in rows:
                click.echo(
                    f"{r['value']!s:>28} {r['threshold_tokens'] / 1000:>7.1f} {r['offload_fraction'] * 100:>6.1f} "
                    f"{str(r['n_pd_prefill']) + '/' + str(r['n_pd_decode']):>5} {r['lambda_max']:>7.2f} "
                    f"{r['baselines']['homogeneous']['lambda_max']:>7.2f} "
                    f"{r['baselines']['naive_heterogeneous']['lambda_max']:>7.2f} "
                    f"{r['ratios']['vs_homogeneous']:>5.2f}x {r['egress_gbps']:>7.2f}"
                )
            return
        result = _run(config, with_curves=plot_dir is not None)
    except PlannerConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(_json(result.to_dict()))
    else:
        click.echo(summary_table(result))
    if values_file is not None:
        write_text(values_file, plan_values(result), "--emit-values")
        click.echo(f"wrote {values_file}", err=as_json)
    if plot_dir is not None:
        from prfaas_plugin.planner.plot import write_plots

        for p in write_plots(result, plot_dir):
            click.echo(f"wrote {p}", err=as_json)
