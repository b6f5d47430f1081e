"""Exhaustive, deterministic grid search over (t, N_p/N_d), plus the paper's two baselines.

The paper notes Theta_prfaas/p falls and Theta_pd-p/(1-p) rises as t grows, so Lambda_max is
unimodal in t; a plain grid is still used because it is exact for the inputs, cheap (about
1.3K thresholds x N_pd splits, well under a second) and robust to integer instance counts.
Ties go to the better-balanced point (Eq. 7), then to the larger t (less cross-DC traffic).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from prfaas_plugin.planner.equations import (
    MIB_BITS,
    Operating,
    lambda_max,
    theta_pd_decode,
    theta_pd_prefill,
    theta_prfaas,
)
from prfaas_plugin.planner.profile import Profile
from prfaas_plugin.planner.workload import LengthDistribution


@dataclass(frozen=True)
class System:
    prfaas: Profile
    local: Profile
    n_prfaas: int
    n_pd: int
    link_gbps: float
    bs_max: float
    t_decode_s: float
    out_tokens: float
    #: Instances of the homogeneous baseline (all local type); the paper uses n_pd + n_prfaas.
    homogeneous_instances: int
    gpus_per_instance: int = 8
    price_prfaas_gpu_hour: float | None = None
    price_local_gpu_hour: float | None = None

    def __post_init__(self) -> None:
        if self.n_prfaas < 0:
            raise ValueError(f"prfaas_instances must be >= 0, got {self.n_prfaas}")
        if self.n_pd < 2:
            raise ValueError(f"pd_instances must be >= 2 (at least one prefill and one decode), got {self.n_pd}")
        if self.homogeneous_instances < 2:
            raise ValueError("homogeneous baseline needs >= 2 instances")
        for name in ("link_gbps", "bs_max", "t_decode_s", "out_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    def decode_rate_per_instance(self) -> float:
        return theta_pd_decode(1, self.bs_max, self.t_decode_s, self.out_tokens)


def evaluate(system: System, workload: LengthDistribution, t: float, n_p: int) -> Operating:
    """The model at threshold ``t`` with ``n_p`` PD-prefill and ``n_pd - n_p`` decode instances."""
    return _evaluate_split(system, t, workload.split(t), n_p)


def _evaluate_split(system: System, t: float, split: tuple[float, float, float], n_p: int) -> Operating:
    p, l_long, l_short = split
    n_d = system.n_pd - n_p
    if p > 0 and system.n_prfaas > 0:
        th_pf, th_c, th_b = theta_prfaas(system.n_prfaas, system.prfaas, l_long, system.link_gbps)
    else:
        th_pf, th_c, th_b = 0.0, 0.0, 0.0
    th_pp = theta_pd_prefill(n_p, system.local, l_short) if p < 1 else 0.0
    th_pd = theta_pd_decode(n_d, system.bs_max, system.t_decode_s, system.out_tokens)
    if p > 0 and system.n_prfaas == 0:
        lam = 0.0  # long requests have nowhere to go
    elif p < 1 and n_p == 0:
        lam = 0.0
    else:
        lam = lambda_max(th_pf, th_pp, th_pd, p)
    egress = p * lam * system.prfaas.kv_mib(l_long) * MIB_BITS / 1e9 if p > 0 else 0.0
    return Operating(t, p, l_long, l_short, n_p, n_d, th_pf, th_c, th_b, th_pp, th_pd, lam, egress)


def threshold_grid(workload: LengthDistribution, step: float) -> np.ndarray:
    """Every ``step`` tokens across the workload's range, plus both ends (all offloaded / none)."""
    if step <= 0:
        raise ValueError("threshold_step must be > 0")
    lo, hi = float(workload.lo), float(workload.hi)
    start = math.floor(lo / step) * step
    grid = np.arange(start, hi + step, step)
    return np.unique(np.concatenate([[max(lo - 1, 0.0)], grid[(grid >= lo) & (grid <= hi)], [hi]]))


def _better(a: Operating, b: Operating | None) -> bool:
    if b is None:
        return True
    if a.lambda_max > b.lambda_max * (1 + 1e-12):
        return True
    if a.lambda_max < b.lambda_max * (1 - 1e-12):
        return False
    imb_a = abs(a.prfaas_rate - a.pd_prefill_rate) if math.isfinite(a.prfaas_rate + a.pd_prefill_rate) else math.inf
    imb_b = abs(b.prfaas_rate - b.pd_prefill_rate) if math.isfinite(b.prfaas_rate + b.pd_prefill_rate) else math.inf
    if imb_a != imb_b:
        return imb_a < imb_b
    return a.threshold > b.threshold


def search_threshold(system: System, workload: LengthDistribution, n_p: int, step: float = 100.0) -> Operating:
    """Best t for a fixed split (the router's short-term loop re-runs this)."""
    if not 0 <= n_p <= system.n_pd:
        raise ValueError(f"n_p must be within 0..{system.n_pd}")
    best = None
    for t in threshold_grid(workload, step):
        op = evaluate(system, workload, float(t), n_p)
        if _better(op, best):
            best = op
    assert best is not None
    return best


def search(system: System, workload: LengthDistribution, step: float = 100.0) -> Operating:
    """Best (t, N_p, N_d) over every split with at least one prefill and one decode instance."""
    best = None
    for t in threshold_grid(workload, step):
        split = workload.split(float(t))  # shared by every split at this t
        for n_p in range(1, system.n_pd):
            op = _evaluate_split(system, float(t), split, n_p)
            if _better(op, best):
                best = op
    assert best is not None
    return best


@dataclass(frozen=True)
class Baseline:
    lambda_max: float
    n_prefill: int
    n_decode: int
    theta_prefill: float
    theta_decode: float


def homogeneous(system: System, workload: LengthDistribution) -> Baseline:
    """All instances of the local type, best P/D split, every prefill local (no threshold)."""
    l_avg = workload.mean()
    best = None
    for n_p in range(1, system.homogeneous_instances):
        th_p = theta_pd_prefill(n_p, system.local, l_avg)
        th_d = theta_pd_decode(system.homogeneous_instances - n_p, system.bs_max, system.t_decode_s, system.out_tokens)
        cand = Baseline(min(th_p, th_d), n_p, system.homogeneous_instances - n_p, th_p, th_d)
        if best is None or cand.lambda_max > best.lambda_max:
            best = cand
    assert best is not None
    return best


def naive_heterogeneous(system: System, workload: LengthDistribution) -> Baseline:
    """Every prefill on the PrfaaS instances, every local instance decodes; no routing."""
    l_avg = workload.mean()
    th_p, _c, _b = theta_prfaas(system.n_prfaas, system.prfaas, l_avg, system.link_gbps)
    th_d = theta_pd_decode(system.n_pd, system.bs_max, system.t_decode_s, system.out_tokens)
    return Baseline(min(th_p, th_d), system.n_prfaas, system.n_pd, th_p, th_d)


@dataclass
class PlanResult:
    best: Operating
    homogeneous: Baseline
    naive: Baseline
    system: System
    mean_length: float
    curves: dict[str, Any] = field(default_factory=dict)

    def cost_per_hour(self) -> dict[str, float] | None:
        s = self.system
        if s.price_prfaas_gpu_hour is None or s.price_local_gpu_hour is None:
            return None
        g = s.gpus_per_instance
        return {
            "prfaas_pd": g * (s.n_prfaas * s.price_prfaas_gpu_hour + s.n_pd * s.price_local_gpu_hour),
            "homogeneous": g * s.homogeneous_instances * s.price_local_gpu_hour,
            "naive_heterogeneous": g * (s.n_prfaas * s.price_prfaas_gpu_hour + s.n_pd * s.price_local_gpu_hour),
        }

    def to_dict(self) -> dict[str, Any]:
        b, s = self.best, self.system
        out: dict[str, Any] = {
            "threshold_tokens": b.threshold,
            "offload_fraction": b.p,
            "l_long": b.l_long,
            "l_short": b.l_short,
            "mean_length": self.mean_length,
            "n_prfaas": s.n_prfaas,
            "n_pd_prefill": b.n_p,
            "n_pd_decode": b.n_d,
            "theta_prfaas": b.theta_prfaas,
            "theta_prfaas_compute": b.theta_prfaas_compute,
            "theta_prfaas_bandwidth": b.theta_prfaas_bandwidth,
            "theta_pd_prefill": b.theta_pd_p,
            "theta_pd_decode": b.theta_pd_d,
            "lambda_max": b.lambda_max,
            "egress_gbps": b.egress_gbps,
            "link_gbps": s.link_gbps,
            "link_utilisation": b.egress_gbps / s.link_gbps,
            "prfaas_bound": "bandwidth" if b.theta_prfaas_bandwidth < b.theta_prfaas_compute else "compute",
            "baselines": {"homogeneous": asdict(self.homogeneous), "naive_heterogeneous": asdict(self.naive)},
            "ratios": {
                "vs_homogeneous": b.lambda_max / self.homogeneous.lambda_max,
                "vs_naive_heterogeneous": b.lambda_max / self.naive.lambda_max,
                "naive_vs_homogeneous": self.naive.lambda_max / self.homogeneous.lambda_max,
            },
        }
        cost = self.cost_per_hour()
        if cost:
            per = {k: v for k, v in cost.items()}
            out["cost_per_hour"] = per
            out["ratios"]["cost_normalised_vs_homogeneous"] = (b.lambda_max / per["prfaas_pd"]) / (
                self.homogeneous.lambda_max / per["homogeneous"]
            )
        return out


def sweep_curves(system: System, workload: LengthDistribution, best: Operating, step: float) -> dict[str, Any]:
    """Data for the paper's Fig. 5: Lambda_max against t at the best split (with the crossing
    curves), and against N_p at the best t."""
    ts, lam, pf, pp, pd = [], [], [], [], []
    for t in threshold_grid(workload, step):
        op = evaluate(system, workload, float(t), best.n_p)
        ts.append(float(t))
        lam.append(op.lambda_max)
        pf.append(op.prfaas_rate)
        pp.append(op.pd_prefill_rate)
        pd.append(op.theta_pd_d)
    nps, lam_np = [], []
    for n_p in range(1, system.n_pd):
        nps.append(n_p)
        lam_np.append(evaluate(system, workload, best.threshold, n_p).lambda_max)
    return {
        "t": ts,
        "lambda_t": lam,
        "prfaas_over_p": pf,
        "pdp_over_1mp": pp,
        "theta_pd_d": pd,
        "n_p": nps,
        "lambda_np": lam_np,
    }


def plan(system: System, workload: LengthDistribution, step: float = 100.0, with_curves: bool = False) -> PlanResult:
    best = search(system, workload, step)
    res = PlanResult(
        best, homogeneous(system, workload), naive_heterogeneous(system, workload), system, workload.mean()
    )
    if with_curves:
        res.curves = sweep_curves(system, workload, best, step)
    return res
