"""The PrfaaS capacity planner: the paper's throughput model (Eqs. 1-8) and its exact search.

Python API (the router's ``auto`` threshold uses it):

    from prfaas_plugin.planner import Empirical, load_config, plan, search_threshold
    cfg, base = load_config("examples/planner/case_study.yaml")
    result = plan(cfg.system(), cfg.length_distribution(base))       # best t and split
    op = search_threshold(cfg.system(), Empirical.from_samples(observed_lengths), n_p=3)
"""

from prfaas_plugin.planner.config import PlannerConfig, PlannerConfigError, load_config
from prfaas_plugin.planner.equations import Operating, lambda_max, phi_kv_gbps
from prfaas_plugin.planner.profile import Curve, Profile, table_profile
from prfaas_plugin.planner.search import (
    Baseline,
    PlanResult,
    System,
    evaluate,
    homogeneous,
    naive_heterogeneous,
    plan,
    search,
    search_threshold,
)
from prfaas_plugin.planner.workload import Empirical, LengthDistribution, TruncatedLogNormal

__all__ = [
    "Baseline",
    "Curve",
    "Empirical",
    "LengthDistribution",
    "Operating",
    "PlanResult",
    "PlannerConfig",
    "PlannerConfigError",
    "Profile",
    "System",
    "TruncatedLogNormal",
    "evaluate",
    "homogeneous",
    "lambda_max",
    "load_config",
    "naive_heterogeneous",
    "phi_kv_gbps",
    "plan",
    "search",
    "search_threshold",
    "table_profile",
]
