"""`prfaas demo`: the whole PrfaaS deployment on this machine (see prfaas_plugin/demo/run.py)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(name="demo")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("out/demo"), show_default=True)
@click.option("--requests", type=click.IntRange(1, 1000), default=24, show_default=True)
@click.option("--short", is_flag=True, help="a quick run (8 requests), as CI does")
@click.option("--link-gbit", type=float, default=1.0, show_default=True, help="emulated link rate")
@click.option("--rtt-ms", type=float, default=20.0, show_default=True, help="emulated round-trip time")
@click.option(
    "--emulate",
    type=click.Choice(["auto", "netns", "loopback"]),
    default="auto",
    show_default=True,
    help="netns needs root; auto falls back to loopback and says so",
)
@click.option("--threshold", default="auto", show_default=True, help="'auto' or a fixed number of tokens")
def command(
    out_dir: Path, requests: int, short: bool, link_gbit: float, rtt_ms: float, emulate: str, threshold: str
) -> None:
    """Start a PrfaaS prefill instance and a local instance (real vLLM on CPU, a tiny hybrid model)
    joined by an emulated cross-datacenter link, put the router in front, send a mixed workload,
    and report routes, KV bytes, TTFT, egress and output equality."""
    from prfaas_plugin.demo.run import DemoOptions, run_demo

    if threshold != "auto":
        try:
            float(threshold)
        except ValueError:
            raise click.BadParameter("must be 'auto' or a number", param_hint="--threshold") from None
    opts = DemoOptions(
        out_dir=out_dir,
        requests=8 if short else requests,
        link_gbit=link_gbit,
        rtt_ms=rtt_ms,
        emulate=emulate,
        threshold=threshold,
    )
    try:
        report = run_demo(opts)
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; every process and namespace was stopped") from None
    jpath, ppath = report.write(out_dir)
    click.echo(report.table())
    t = report.totals()
    click.echo("")
    click.echo(f"offloaded {t['offload_fraction']:.0%} of requests; routes used: {', '.join(t['routes_used'])}")
    click.echo(
        f"PrfaaS egress {t['egress_gbit_per_s'] * 1e3:.3f} Mbit/s on a {t['link_gbit']:g} Gbit/s link "
        f"({report.link['emulated']}); KV sent {t['kv_bytes_total'] / 2**20:.1f} MiB"
    )
    click.echo(f"outputs equal to the single-instance run: {'ALL' if t['all_outputs_equal'] else 'NOT ALL'}")
    click.echo(f"start-up {t['startup_s']:.0f} s, workload {t['wall_s']:.1f} s; report: {jpath}, figure: {ppath}")
    if not t["all_outputs_equal"] or t["errors"]:
        raise SystemExit(1)
