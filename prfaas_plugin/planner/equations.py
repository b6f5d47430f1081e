"""The paper's throughput model (section 3.4), one function per equation.

Units: lengths in tokens, times in seconds, S_kv in MiB (2^20 B), bandwidth in Gbit/s (1e9 bit/s)
-- the only choice under which the paper's Table 5 reproduces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prfaas_plugin.planner.profile import Profile

MIB_BITS = 8 * 2**20


def phi_kv_gbps(profile: Profile, tokens: float) -> float:
    """Eq. 1: per-instance KV throughput Phi_kv(l) = S_kv(l) / T_prefill(l)."""
    return profile.kv_mib(tokens) * MIB_BITS / _prefill_s(profile, tokens) / 1e9


def min_egress_gbps(n_instances: int, profile: Profile, l_avg: float) -> float:
    """Eq. 2: B_out ~= N/P * Phi_kv(L_avg) (N/P = instances)."""
    return n_instances * phi_kv_gbps(profile, l_avg)


def _prefill_s(profile: Profile, tokens: float) -> float:
    t = profile.prefill_s(tokens)
    if not t > 0:
        raise ValueError(
            f"profile {profile.name!r}: T_prefill({tokens:.0f}) = {t:g} s; its table's fit reaches zero "
            "there (add rows or use t_interpolation: linear)"
        )
    return t


def _kv_mib(profile: Profile, tokens: float) -> float:
    s = profile.kv_mib(tokens)
    if not s > 0:
        raise ValueError(f"profile {profile.name!r}: S_kv({tokens:.0f}) = {s:g} MiB; its table extrapolates to zero")
    return s


def theta_prfaas(n_prfaas: int, profile: Profile, l_long: float, link_gbps: float) -> tuple[float, float, float]:
    """Eq. 3: min(N_prfaas / T_prefill(l_long), B_out / S_kv(l_long)); also returns both terms."""
    compute = n_prfaas / _prefill_s(profile, l_long)
    bandwidth = link_gbps * 1e9 / (_kv_mib(profile, l_long) * MIB_BITS)
    return min(compute, bandwidth), compute, bandwidth


def theta_pd_prefill(n_p: int, profile: Profile, l_short: float) -> float:
    """Eq. 4: N_p / T_prefill(l_short)."""
    return n_p / _prefill_s(profile, l_short)


def theta_pd_decode(n_d: int, bs_max: float, t_decode_s: float, out_tokens: float) -> float:
    """Eq. 5: N_d * BS_max / (T_decode * L_out)."""
    return n_d * bs_max / (t_decode_s * out_tokens)


@dataclass(frozen=True)
class Operating:
    """One (t, N_p, N_d) point of the model."""

    threshold: float
    p: float
    l_long: float
    l_short: float
    n_p: int
    n_d: int
    theta_prfaas: float
    theta_prfaas_compute: float
    theta_prfaas_bandwidth: float
    theta_pd_p: float
    theta_pd_d: float
    lambda_max: float
    egress_gbps: float

    @property
    def prfaas_rate(self) -> float:
        """Theta_prfaas / p: the arrival rate the PrfaaS path can sustain."""
        return self.theta_prfaas / self.p if self.p > 0 else math.inf

    @property
    def pd_prefill_rate(self) -> float:
        """Theta_pd-p / (1 - p)."""
        return self.theta_pd_p / (1 - self.p) if self.p < 1 else math.inf


def lambda_max(theta_prfaas_: float, theta_pd_p: float, theta_pd_d: float, p: float) -> float:
    """Eq. 6: min(Theta_prfaas / p, Theta_pd-p / (1 - p), Theta_pd-d); a path that carries no
    traffic (p = 0 or p = 1) imposes no limit."""
    a = theta_prfaas_ / p if p > 0 else math.inf
    b = theta_pd_p / (1 - p) if p < 1 else math.inf
    return min(a, b, theta_pd_d)
