"""The planner's YAML input, validated at the edge (unknown keys, bad values and empty tables are
errors that name the field). Schema documented in docs/planner.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from prfaas_plugin.planner.profile import Profile, table_profile
from prfaas_plugin.planner.search import PlanResult, System, plan
from prfaas_plugin.planner.workload import Empirical, LengthDistribution, TruncatedLogNormal
from prfaas_plugin.yamlconfig import load_yaml_model

#: Upper bounds that keep one ``prfaas plan`` to seconds (the search is grid points x splits;
#: about 1.6e5 evaluations per second on one core). The paper's case study needs 9.2e3.
MAX_INSTANCES = 10_000
MAX_EVALUATIONS = 2_000_000


class PlannerConfigError(ValueError):
    """A planner config that cannot be used; the message names the field."""


class _Strict(BaseModel):
    # nan/inf are refused at the edge: every number here feeds a division or a grid.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class LogNormalSpec(_Strict):
    mu: float
    sigma: float = Field(gt=0)
    min: float = Field(gt=0)
    max: float = Field(gt=0)

    @model_validator(mode="after")
    def _range(self) -> LogNormalSpec:
        if self.min >= self.max:
            raise ValueError(f"min ({self.min}) must be below max ({self.max})")
        return self


class WorkloadSpec(_Strict):
    lognormal: LogNormalSpec | None = None
    lengths_file: str | None = None
    output_tokens: float = Field(gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> WorkloadSpec:
        if (self.lognormal is None) == (self.lengths_file is None):
            raise ValueError("give exactly one of workload.lognormal or workload.lengths_file")
        return self


class TableProfileSpec(_Strict):
    lengths: list[float] = Field(min_length=2)
    t_prefill_s: list[float] = Field(min_length=2)
    s_kv_mib: list[float] = Field(min_length=2)
    t_interpolation: Literal["linear", "quadratic"] = "quadratic"
    s_interpolation: Literal["linear", "quadratic"] = "linear"
    note: str = ""

    @model_validator(mode="after")
    def _lengths_match(self) -> TableProfileSpec:
        if not len(self.lengths) == len(self.t_prefill_s) == len(self.s_kv_mib):
            raise ValueError("lengths, t_prefill_s and s_kv_mib must have the same number of rows")
        return self


class DerivedProfileSpec(_Strict):
    derived_from: str
    compute_ratio: float = Field(gt=0)
    fixed_ratio: float = Field(gt=0, default=1.0)
    note: str = ""


class DeploymentSpec(_Strict):
    prfaas_profile: str
    pd_profile: str
    # >= 1: the model (paper Eqs. 3, 6) and its naive baseline send long prefills to the PrfaaS
    # cluster; a cluster without one is the homogeneous baseline, which every plan reports.
    prfaas_instances: int = Field(le=MAX_INSTANCES)
    pd_instances: int = Field(ge=2, le=MAX_INSTANCES)
    homogeneous_instances: int | None = Field(default=None, ge=2, le=MAX_INSTANCES)
    gpus_per_instance: int = Field(default=8, ge=1)
    gpu_price_per_hour: dict[str, float] | None = None

    @field_validator("prfaas_instances")
    @classmethod
    def _some_prfaas(cls, n: int) -> int:
        if n < 1:
            raise ValueError(
                f"must be >= 1, got {n}: long prefills go to the PrfaaS cluster (for a cluster without one, "
                "see the homogeneous baseline that every plan reports)"
            )
        return n

    @model_validator(mode="after")
    def _prices(self) -> DeploymentSpec:
        for name, price in (self.gpu_price_per_hour or {}).items():
            if price <= 0:
                raise ValueError(f"gpu_price_per_hour.{name} must be > 0 (cost ratios divide by it), got {price}")
        return self


class DecodeSpec(_Strict):
    bs_max: float = Field(gt=0)
    t_decode_s: float = Field(gt=0)


class LinkSpec(_Strict):
    gbps: float = Field(gt=0)


class SearchSpec(_Strict):
    # Lengths are whole tokens: a step below one token only multiplies the work.
    threshold_step: float = Field(default=100.0, ge=1)


class PlannerConfig(_Strict):
    workload: WorkloadSpec
    profiles: dict[str, TableProfileSpec | DerivedProfileSpec] = Field(min_length=1)
    deployment: DeploymentSpec
    decode: DecodeSpec
    link: LinkSpec
    search: SearchSpec = SearchSpec()
    notes: str = ""
    #: ``prfaas simulate``'s section (validated by prfaas_plugin.sim.config); the planner ignores it.
    simulation: dict[str, Any] | None = None

    def profile(self, name: str, _seen: tuple[str, ...] = ()) -> Profile:
        if name not in self.profiles:
            raise PlannerConfigError(f"profile {name!r} is not defined (have: {', '.join(sorted(self.profiles))})")
        if name in _seen:
            raise PlannerConfigError(f"profiles derive from each other in a cycle: {' -> '.join(_seen + (name,))}")
        spec = self.profiles[name]
        if isinstance(spec, DerivedProfileSpec):
            base = self.profile(spec.derived_from, _seen + (name,))
            return base.derive(name, spec.compute_ratio, spec.fixed_ratio)
        try:
            return table_profile(
                name, spec.lengths, spec.t_prefill_s, spec.s_kv_mib, spec.t_interpolation, spec.s_interpolation
            )
        except ValueError as exc:
            raise PlannerConfigError(f"profiles.{name}: {exc}") from None

    def length_distribution(self, base_dir: Path | None = None) -> LengthDistribution:
        w = self.workload
        if w.lognormal is not None:
            ln = w.lognormal
            try:
                return TruncatedLogNormal(ln.mu, ln.sigma, ln.min, ln.max)
            except ValueError as exc:
                raise PlannerConfigError(f"workload.lognormal: {exc}") from None
        path = Path(w.lengths_file or "")
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        try:
            return Empirical.from_file(str(path))
        except ValueError as exc:
            raise PlannerConfigError(f"workload.lengths_file: {exc}") from None

    def system(self) -> System:
        d = self.deployment
        prices = d.gpu_price_per_hour or {}
        for name in prices:
            if name not in self.profiles:
                raise PlannerConfigError(f"deployment.gpu_price_per_hour names unknown profile {name!r}")
        try:
            return System(
                prfaas=self.profile(d.prfaas_profile),
                local=self.profile(d.pd_profile),
                n_prfaas=d.prfaas_instances,
                n_pd=d.pd_instances,
                link_gbps=self.link.gbps,
                bs_max=self.decode.bs_max,
                t_decode_s=self.decode.t_decode_s,
                out_tokens=self.workload.output_tokens,
                homogeneous_instances=d.homogeneous_instances or (d.pd_instances + d.prfaas_instances),
                gpus_per_instance=d.gpus_per_instance,
                price_prfaas_gpu_hour=prices.get(d.prfaas_profile),
                price_local_gpu_hour=prices.get(d.pd_profile),
            )
        except ValueError as exc:
            raise PlannerConfigError(str(exc)) from None

    def plan(self, base_dir: Path | None = None, with_curves: bool = False) -> PlanResult:
        """The plan of this config; inputs the model cannot use raise PlannerConfigError."""
        system, workload = self.system(), self.length_distribution(base_dir)
        step = self.search.threshold_step
        evaluations = ((workload.hi - workload.lo) / step + 2) * (system.n_pd - 1)
        if evaluations > MAX_EVALUATIONS:
            raise PlannerConfigError(
                f"search.threshold_step {step:g} over lengths {workload.lo:g}..{workload.hi:g} with "
                f"deployment.pd_instances {system.n_pd} needs {evaluations:.3g} evaluations (limit "
                f"{MAX_EVALUATIONS:.0e}); raise threshold_step or lower pd_instances"
            )
        try:
            return plan(system, workload, step, with_curves=with_curves)
        except ValueError as exc:
            raise PlannerConfigError(str(exc)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> tuple[PlannerConfig, Path]:
    """Read and validate a planner YAML; ``overrides`` maps dotted keys to values (sweeps)."""

    def apply(raw: dict[str, Any]) -> None:
        for dotted, value in (overrides or {}).items():
            _set_dotted(raw, dotted, value)

    cfg = load_yaml_model(path, PlannerConfig, "planner config", PlannerConfigError, apply)
    return cfg, Path(path).parent


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur: Any = raw
    for k in keys[:-1]:
        if not isinstance(cur, dict) or k not in cur:
            raise PlannerConfigError(f"override {dotted!r}: no such key {k!r}")
        cur = cur[k]
    if not isinstance(cur, dict) or keys[-1] not in cur:
        raise PlannerConfigError(f"override {dotted!r}: no such key {keys[-1]!r}")
    cur[keys[-1]] = value
