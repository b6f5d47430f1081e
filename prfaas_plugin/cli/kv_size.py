"""`prfaas kv-size`: what a model's prefill hands to decode, per token and per request."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import click

from prfaas_plugin.kvsize import MIB, ConfigError, ModelKV


def parse_lengths(text: str) -> list[int]:
    """'1K,8K,32K,128K' -> [1024, 8192, 32768, 131072] (K = 1024, as in the paper's tables)."""
    out = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmM]?)", part)
        if not m:
            raise click.BadParameter(f"not a length: {part!r} (use e.g. 4096, 8K, 1M)", param_hint="--lengths")
        scale = {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
        value = int(float(m.group(1)) * scale)
        if value <= 0:
            raise click.BadParameter(f"lengths must be > 0, got {part!r}", param_hint="--lengths")
        out.append(value)
    return out


@click.command(name="kv-size")
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--lengths", default="1K,8K,32K,128K", show_default=True, help="uncached prompt lengths")
@click.option("--prefill-tokens-per-s", type=float, default=None, help="instance prefill rate, for Phi_kv")
@click.option("--kv-dtype", default=None, help="KV cache dtype (bf16, fp8...); default: the model's dtype")
@click.option(
    "--state-dtype", default=None, help="recurrent state dtype (bf16, fp32); default: mamba_ssm_dtype or the model's"
)
@click.option("--json", "as_json", is_flag=True)
def command(
    config: Path,
    lengths: str,
    prefill_tokens_per_s: float | None,
    kv_dtype: str | None,
    state_dtype: str | None,
    as_json: bool,
) -> None:
    """Per-token bytes, fixed bytes per request, S_kv(l) and (with a prefill rate) Phi_kv in Gbit/s
    for a Hugging Face CONFIG (config.json)."""
    if prefill_tokens_per_s is not None and not 0 < prefill_tokens_per_s < math.inf:
        raise click.BadParameter(
            f"must be finite and > 0, got {prefill_tokens_per_s}", param_hint="--prefill-tokens-per-s"
        )
    try:
        model = ModelKV.from_file(config, kv_dtype=kv_dtype, state_dtype=state_dtype)
    except (ConfigError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    summary = model.summary(parse_lengths(lengths), prefill_tokens_per_s)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(
        f"{summary['model']} ({summary['family']}): " + ", ".join(f"{n} x {k}" for k, n in summary["layers"].items())
    )
    click.echo(f"  per token        {summary['bytes_per_token']:>14,} B")
    click.echo(
        f"  fixed / request  {summary['fixed_bytes_per_request']:>14,} B  ({summary['fixed_bytes_per_request'] / MIB:.2f} MiB:"
        f" state {summary['state_bytes_per_request'] / MIB:.2f}, window {summary['window_bytes_per_request'] / MIB:.2f})"
    )
    head = f"  {'tokens':>9} {'S_kv MiB':>12}" + (f" {'Phi_kv Gbit/s':>14}" if prefill_tokens_per_s else "")
    click.echo(head)
    for row in summary["lengths"]:
        line = f"  {row['tokens']:>9,} {row['kv_mib']:>12,.2f}"
        if prefill_tokens_per_s:
            line += f" {row['phi_kv_gbps']:>14.3f}"
        click.echo(line)
