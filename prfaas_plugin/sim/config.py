"""The ``simulation:`` section of a planner YAML (the planner ignores it), validated strictly: an
unknown key, a negative rate or a link trace whose time runs backwards is an error naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from prfaas_plugin.planner.config import PlannerConfig, PlannerConfigError, load_config

DeploymentKind = Literal["prfaas_pd", "prfaas_pd_online", "homogeneous", "naive"]


#: Time-series bins per deployment: 1e6 bins x a handful of float series stays in tens of MB.
MAX_BINS = 1_000_000


class SimConfigError(ValueError):
    """A simulation config that cannot be used; the message names the field."""


class _Strict(BaseModel):
    # nan/inf are refused at the edge, as in the planner's config.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class RateChange(_Strict):
    """Multiply the arrival rate by ``factor`` during [at_s, at_s + duration_s) (a burst or a lull)."""

    at_s: float = Field(ge=0)
    duration_s: float = Field(gt=0)
    factor: float = Field(gt=0)


class ArrivalSpec(_Strict):
    #: poisson: exponential gaps; gamma: gaps with coefficient of variation ``cv`` (cv > 1 is
    #: bursty); onoff: Poisson at ``rate`` for ``on_s``, then silence for ``off_s``; trace: replay
    #: ``trace`` (JSONL: t, prompt_tokens, optional cached_tokens and prefix).
    kind: Literal["poisson", "gamma", "onoff", "trace"] = "poisson"
    rate: float | None = Field(default=None, gt=0)
    cv: float = Field(default=1.0, gt=0)
    on_s: float = Field(default=60.0, gt=0)
    off_s: float = Field(default=60.0, ge=0)
    trace: str | None = None
    changes: list[RateChange] = Field(default_factory=list)

    @model_validator(mode="after")
    def _need(self) -> ArrivalSpec:
        if self.kind == "trace":
            if not self.trace:
                raise ValueError("kind 'trace' needs arrivals.trace (a JSONL file)")
        elif self.rate is None:
            raise ValueError(f"kind {self.kind!r} needs arrivals.rate (requests per second, > 0)")
        return self


class PrefixSpec(_Strict):
    """Shared documents: a ``share`` of requests start with one of ``documents`` documents of
    ``doc_tokens`` tokens picked by a Zipf law of exponent ``zipf_s`` (0 = uniform); the rest of
    their prompt is drawn from the workload's length distribution."""

    share: float = Field(default=0.0, ge=0, le=1)
    documents: int = Field(default=100, ge=1)
    doc_tokens: int = Field(default=16384, ge=1)
    zipf_s: float = Field(default=1.0, ge=0)


class LinkPoint(_Strict):
    """From ``at_s`` on, the cross-datacenter link gives this deployment ``gbps`` (a dip, or what a
    second tenant leaves)."""

    at_s: float = Field(ge=0)
    gbps: float = Field(gt=0)


class ControllerSpec(_Strict):
    """Settings of the router's ThresholdSpec for the ``online`` variants (router/config.py)."""

    reoptimize_every_s: float = Field(default=30.0, gt=0)
    window: int = Field(default=512, ge=8)
    min_samples: int = Field(default=32, ge=1)
    egress_high: float = Field(default=0.85, gt=0, le=1.5)
    egress_low: float = Field(default=0.6, gt=0, le=1.5)
    queue_low: int = Field(default=4, ge=0)
    step: float = Field(default=0.15, gt=0, lt=1)
    egress_window_s: float = Field(default=10.0, gt=0)
    apply_split: bool = True
    split_cooldown_s: float = Field(default=300.0, gt=0)


class MeasuredPath(_Strict):
    """The whole request path of one deployment, timed per route on lone requests (nothing
    queued) at ``lengths`` uncached tokens -- `prfaas demo`'s calibration phase
    (demo/calibrate.py). With it, a request's service times are these, linearly interpolated
    (and extrapolated from the outer pairs), instead of the profile's T_prefill plus the model's
    decode step: at small scale the fixed costs (router, HTTP, engine scheduling, the transfer's
    handshake, the decode's first step) outweigh prefill compute, and only a measurement knows them.

    - ``local_ttft_s``: a request prefilled and decoded on one "both" instance, to its first token;
    - ``prfaas_producer_s``: the router's producer round trip of an offloaded request;
    - ``prfaas_ttft_s``: an offloaded request to its first token; what follows the producer is the
      transfer and the decode instance's first step (``decode_step_s``);

    Of these only the prefill's compute (the profile's T_prefill) holds an instance exclusively,
    and the first decode step its decode instance; the rest overlaps with other requests (an
    engine batches them), see ``model._Sim._measured_path``.
    - ``decode_step_s``: one decode step of the instance (the TPOT of the same requests).

    The times above are typical (medians); the spreads carry their measured variation: each
    calibration sample over the median at its length (local: its TTFT; PrfaaS: its producer time
    and its TTFT, kept as a pair). A request draws one sample of its route's spread (the seed's
    random stream) and scales the interpolated times by it; empty: every request takes the medians.
    The ``*_busy`` spreads hold samples timed while the other route was kept busy (ratios to the
    same lone medians): a request that arrives while another one is open draws from them.
    The ``*_pair`` spreads hold samples timed while another request of the same route was open
    (PrfaaS: two prefills on the producer, two transfers into one decode instance; local: two
    prefills batched on one engine): a request that arrives while another of its route is open
    draws from them (else from the busy spread)."""

    lengths: list[int] = Field(min_length=2)
    local_ttft_s: list[float]
    prfaas_producer_s: list[float]
    prfaas_ttft_s: list[float]
    decode_step_s: float = Field(gt=0)
    local_spread: list[float] = Field(default_factory=list)
    prfaas_spread: list[tuple[float, float]] = Field(default_factory=list)
    local_spread_busy: list[float] = Field(default_factory=list)
    prfaas_spread_busy: list[tuple[float, float]] = Field(default_factory=list)
    local_spread_pair: list[float] = Field(default_factory=list)
    prfaas_spread_pair: list[tuple[float, float]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> MeasuredPath:
        n = len(self.lengths)
        if any(b <= a for a, b in zip(self.lengths, self.lengths[1:])) or self.lengths[0] <= 0:
            raise ValueError(f"lengths: must be positive and increasing, got {self.lengths}")
        for name in ("local_ttft_s", "prfaas_producer_s", "prfaas_ttft_s"):
            v = getattr(self, name)
            if len(v) != n:
                raise ValueError(f"{name}: needs one value per length ({n}), got {len(v)}")
            if any(not x > 0 for x in v):
                raise ValueError(f"{name}: every time must be > 0, got {v}")
        for name in ("local_spread", "local_spread_busy", "local_spread_pair"):
            if any(not x > 0 for x in getattr(self, name)):
                raise ValueError(f"{name}: every ratio must be > 0")
        for name in ("prfaas_spread", "prfaas_spread_busy", "prfaas_spread_pair"):
            if any(not (a > 0 and b > 0) for a, b in getattr(self, name)):
                raise ValueError(f"{name}: every ratio must be > 0")
        return self

    def at(self, name: str, tokens: float) -> float:
        """``name``'s time at ``tokens``, piecewise linear, extrapolated from the outer pairs, never
        below the smallest measured value's share (a positive floor: half the shortest measurement)."""
        xs, ys = self.lengths, getattr(self, name)
        i = 1
        while i < len(xs) - 1 and tokens > xs[i]:
            i += 1
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        y = y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)
        return max(y, 0.5 * min(ys))


class RouterClock(_Strict):
    """Where the router's own clock stood when the replayed trace began, so the simulated
    threshold loop ticks and re-optimises when the real one did (a re-optimisation a tick earlier
    or later changes t for the requests in between). Times are on the router controller's clock
    (seconds since it started, the clock of its threshold timeline)."""

    #: the router's clock at simulated time 0
    at_start_s: float = Field(ge=0)
    #: a time the router's threshold loop ticked (any; its phase modulo the tick period is used)
    tick_at_s: float = Field(ge=0)
    #: a time the router re-optimised (its phase modulo ``reoptimize_every_s`` is used)
    reoptimised_at_s: float | None = Field(default=None, ge=0)


class SimulationSpec(_Strict):
    duration_s: float = Field(default=3600.0, gt=0)
    #: Requests arriving before this are simulated but left out of every statistic.
    warmup_s: float = Field(default=300.0, ge=0)
    seed: int = 0
    arrivals: ArrivalSpec = ArrivalSpec(rate=1.0)
    prefix: PrefixSpec = PrefixSpec()
    #: Granularity of the simulated prefix cache (tokens per block of the router's PrefixIndex).
    block_tokens: int = Field(default=1024, ge=1)
    link_trace: list[LinkPoint] = Field(default_factory=list)
    #: Round trip of the cross-datacenter link, paid once by every offloaded request.
    link_rtt_ms: float = Field(default=0.0, ge=0)
    #: Where the online controller starts (default: the planner's t, as a warm router would).
    start_threshold: float | None = Field(default=None, ge=0)
    #: Intra-datacenter prefill -> decode hop (RDMA), per transfer, overlapped layer-wise.
    local_hop_gbps: float = Field(default=400.0, gt=0)
    #: Router ``threshold.queue_high``: with every PrfaaS instance this deep, long requests stay
    #: local (policy.prfaas_overloaded). Applies to the fixed-t variants too, as in the router.
    queue_high: int = Field(default=16, ge=1)
    bandwidth_mode: Literal["auto", "scarce", "abundant"] = "auto"
    controller: ControllerSpec = ControllerSpec()
    deployments: list[DeploymentKind] = Field(default_factory=lambda: list(get_args(DeploymentKind)), min_length=1)
    #: Seconds per bin of the time series (egress, threshold, offload share, queue depths).
    bin_s: float = Field(default=10.0, gt=0)
    #: Measured whole-path service times (a replay of a real run); None: the profile's model.
    measured_path: MeasuredPath | None = None
    #: The router's clock at the trace's start (a replay of a real run); None: it starts with it.
    router_clock: RouterClock | None = None

    @model_validator(mode="after")
    def _check(self) -> SimulationSpec:
        if self.warmup_s >= self.duration_s:
            raise ValueError(f"warmup_s ({self.warmup_s}) must be below duration_s ({self.duration_s})")
        if self.bin_s > self.duration_s:
            raise ValueError(f"bin_s ({self.bin_s:g}) must not exceed duration_s ({self.duration_s:g})")
        if self.duration_s / self.bin_s > MAX_BINS:
            raise ValueError(
                f"bin_s ({self.bin_s:g}) cuts duration_s ({self.duration_s:g}) into {self.duration_s / self.bin_s:.3g} "
                f"bins, more than {MAX_BINS:.0e} (each deployment keeps several series of one value a bin)"
            )
        for i in range(1, len(self.link_trace)):
            a, b = self.link_trace[i - 1].at_s, self.link_trace[i].at_s
            if b <= a:
                raise ValueError(f"link_trace[{i}].at_s: time runs backwards ({b} after {a})")
        return self


def parse_simulation(cfg: PlannerConfig, source: str = "config") -> SimulationSpec:
    try:
        return SimulationSpec.model_validate(cfg.simulation or {})
    except ValidationError as exc:
        lines = [f"simulation.{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise SimConfigError(f"{source}: invalid simulation section:\n  " + "\n  ".join(lines)) from None


def load_simulation(
    path: str | Path, overrides: dict[str, Any] | None = None
) -> tuple[PlannerConfig, SimulationSpec, Path]:
    """The planner config and its ``simulation:`` section (defaults when absent). Overrides of
    ``simulation.*`` keys may add keys the file leaves at their defaults; others must exist."""
    sim_over = {k: v for k, v in (overrides or {}).items() if k.startswith("simulation.")}
    plan_over = {k: v for k, v in (overrides or {}).items() if k not in sim_over}
    try:
        cfg, base = load_config(path, plan_over)
    except PlannerConfigError as exc:
        raise SimConfigError(str(exc)) from None
    raw: dict[str, Any] = dict(cfg.simulation or {})
    for dotted, value in sim_over.items():
        cur = raw
        keys = dotted.split(".")[1:]
        for k in keys[:-1]:
            nxt = cur.get(k)
            cur[k] = nxt = dict(nxt) if isinstance(nxt, dict) else {}
            cur = nxt
        cur[keys[-1]] = value
    cfg = cfg.model_copy(update={"simulation": raw})
    return cfg, parse_simulation(cfg, str(path)), base
