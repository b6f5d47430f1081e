"""Running the paper's three deployments (Table 6) on one request stream, and the report: a
summary table, JSON and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from prfaas_plugin.planner.config import PlannerConfig
from prfaas_plugin.planner.search import PlanResult
from prfaas_plugin.sim.config import SimulationSpec
from prfaas_plugin.sim.model import Deployment, DeploymentResult, simulate_deployment
from prfaas_plugin.sim.workload import make_requests

LABELS = {
    "prfaas_pd": "PrfaaS-PD (fixed t)",
    "prfaas_pd_online": "PrfaaS-PD (online t)",
    "homogeneous": "homogeneous PD",
    "naive": "naive heterogeneous",
}


def deployments(cfg: PlannerConfig, result: PlanResult, names: list[str]) -> list[Deployment]:
    """The planner's operating points: PrfaaS-PD at its (t, N_p, N_d), the homogeneous baseline
    at its best P/D split, the naive baseline with every prefill on the PrfaaS cluster."""
    b, h, n = result.best, result.homogeneous, result.naive
    d = cfg.deployment
    out = {
        "prfaas_pd": Deployment("prfaas_pd", d.prfaas_instances, b.n_p, b.n_d, "fixed", b.threshold),
        "prfaas_pd_online": Deployment("prfaas_pd_online", d.prfaas_instances, b.n_p, b.n_d, "online", b.threshold),
        "homogeneous": Deployment("homogeneous", 0, h.n_prefill, h.n_decode, "none", 0.0),
        "naive": Deployment("naive", d.prfaas_instances, 0, n.n_decode, "all", -1.0),
    }
    return [out[k] for k in names]


def run_all(
    cfg: PlannerConfig, sim: SimulationSpec, base_dir: Path, progress: bool = False
) -> tuple[PlanResult, dict[str, DeploymentResult]]:
    result = cfg.plan(base_dir)
    requests = make_requests(sim, cfg.length_distribution(base_dir), base_dir)
    deps = deployments(cfg, result, list(sim.deployments))
    out: dict[str, DeploymentResult] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sim.duration_s * len(deps), unit="sim-s", desc="simulating", leave=False)
    for dep in deps:
        if bar is not None:
            bar.set_postfix_str(dep.name)
        out[dep.name] = simulate_deployment(dep, cfg, sim, requests, bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    return result, out


def planned_rates(result: PlanResult) -> dict[str, tuple[float, float]]:
    """(Lambda_max, egress Gbit/s) the planner gives each deployment."""
    b, n, s = result.best, result.naive, result.system
    naive_egress = n.lambda_max * s.prfaas.kv_mib(result.mean_length) * (1 << 20) * 8 / 1e9
    return {
        "prfaas_pd": (b.lambda_max, b.egress_gbps),
        "prfaas_pd_online": (b.lambda_max, b.egress_gbps),
        "homogeneous": (result.homogeneous.lambda_max, 0.0),
        "naive": (n.lambda_max, naive_egress),
    }


def summary_table(result: PlanResult, runs: dict[str, DeploymentResult], rate: float | None) -> str:
    planned = planned_rates(result)
    head = (
        f"{'deployment':<22}{'thru req/s':>11}{'plan':>7}{'egress Gb/s':>12}{'offload':>8}"
        f"{'TTFT mean':>10}{'P50':>7}{'P90':>7}{'P99':>8}{'unfinished':>11}"
    )
    lines = [f"arrival rate {rate:g} req/s" if rate else "arrivals from trace", head]
    for name, r in runs.items():
        s = r.summary()["ttft"]
        lam, _eg = planned[name]
        if s["n"]:
            tt = f"{s['mean_s']:>10.2f}{s['p50_s']:>7.2f}{s['p90_s']:>7.2f}{s['p99_s']:>8.2f}"
        else:
            tt = f"{'-':>10}{'-':>7}{'-':>7}{'-':>8}"
        lines.append(
            f"{LABELS[name]:<22}{r.throughput_rps:>11.2f}{lam:>7.2f}{r.egress_gbps:>12.2f}"
            f"{r.offload_share * 100:>7.1f}%{tt}{r.unfinished:>11}"
        )
    return "\n".join(lines)


def to_json(result: PlanResult, runs: dict[str, DeploymentResult], sim: SimulationSpec) -> dict[str, Any]:
    planned = planned_rates(result)
    return {
        "simulation": sim.model_dump(),
        "plan": result.to_dict(),
        "deployments": {
            k: {
                **r.summary(),
                "planned_lambda_max": planned[k][0],
                "planned_egress_gbps": planned[k][1],
                "series": r.series,
                "threshold_timeline": r.threshold_timeline[-1000:],
            }
            for k, r in runs.items()
        },
    }


def write_plots(runs: dict[str, DeploymentResult], sim: SimulationSpec, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    t = np.arange(len(next(iter(runs.values())).series["threshold"])) * sim.bin_s / 60

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, r in runs.items():
        if len(r.ttft):
            x = np.sort(r.ttft)
            ax.plot(x, np.arange(1, len(x) + 1) / len(x), label=LABELS[k])
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("CDF")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(out / "ttft_cdf.png")
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    for k, r in runs.items():
        if any(r.series["egress_gbps"]):
            ax.plot(t, r.series["egress_gbps"], label=LABELS[k])
    ax.plot(t, next(iter(runs.values())).series["link_gbps"], "k--", label="link capacity")
    ax.set_xlabel("time (min)")
    ax.set_ylabel("egress (Gbit/s)")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(out / "egress.png")
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for k, r in runs.items():
        if r.deployment.control in ("fixed", "online"):
            a1.plot(t, r.series["offload_share"], label=LABELS[k])
            a2.plot(t, np.array(r.series["threshold"]) / 1000, label=LABELS[k])
    a1.set_ylabel("offload share")
    a2.set_ylabel("threshold t (K tokens)")
    a2.set_xlabel("time (min)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    paths.append(out / "offload_threshold.png")
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    for a, key, label in zip(
        axes,
        ("prfaas_queue", "local_queue", "decode_queue"),
        ("PrfaaS open requests", "local prefill queue", "decode queue"),
        strict=True,
    ):
        for k, r in runs.items():
            a.plot(t, r.series[key], label=LABELS[k])
        a.set_ylabel(label)
        a.grid(alpha=0.3)
    axes[0].legend()
    axes[-1].set_xlabel("time (min)")
    paths.append(out / "queues.png")
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    return paths


def write_json(data: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=float))
