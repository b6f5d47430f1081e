"""The requests a simulation replays: arrival times (Poisson, gamma, on/off, or a JSONL trace),
uncached lengths from the planner's length distribution, and shared document prefixes with a
Zipf skew. Prompts are ``Prompt`` objects: a cheap stand-in for a token list that the router's
PrefixIndex can hash (see ``Prompt``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prfaas_plugin.planner.workload import Empirical, LengthDistribution, TruncatedLogNormal
from prfaas_plugin.sim.config import ArrivalSpec, SimConfigError, SimulationSpec
from prfaas_plugin.yamlconfig import loads_finite_json, read_text


class Prompt(Sequence):
    """A prompt as segments ``(segment id, tokens)``: a shared document, then the request's own
    tokens. It behaves like a token list for ``router.prefix_index.block_keys``: ``len`` is the
    token count and a slice yields one descriptor per segment piece it covers (segment id and
    offsets), so equal content gives equal block keys while hashing costs O(blocks), not O(tokens)
    -- a 128K-token prompt is hashed in microseconds rather than tens of milliseconds."""

    __slots__ = ("segments", "_len")

    def __init__(self, segments: Sequence[tuple[str, int]]) -> None:
        self.segments = tuple((s, int(n)) for s, n in segments if n > 0)
        self._len = sum(n for _s, n in self.segments)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, item):
        if not isinstance(item, slice):
            raise TypeError("a simulated prompt is hashed by slices only")
        a, b, _ = item.indices(self._len)
        out, pos = [], 0
        for seg, n in self.segments:
            lo, hi = max(a, pos), min(b, pos + n)
            if lo < hi:
                out.append(f"{seg}@{lo - pos}:{hi - pos}")
            pos += n
            if pos >= b:
                break
        return out


@dataclass
class SimRequest:
    rid: int
    arrival: float
    prompt: Prompt
    warm_prefix: int = 0  # tokens the trace says were cached: warm on every instance at start


def _sample_lengths(dist: LengthDistribution, n: int, rng: np.random.Generator) -> np.ndarray:
    if isinstance(dist, TruncatedLogNormal):
        return dist.sample(n, seed=int(rng.integers(2**31)))
    if isinstance(dist, Empirical):
        return rng.choice(np.asarray(dist.xs), size=n)
    raise SimConfigError(f"cannot sample a {type(dist).__name__} workload")


def _factor(spec: ArrivalSpec, t: float) -> float:
    f = 1.0
    for c in spec.changes:
        if c.at_s <= t < c.at_s + c.duration_s:
            f *= c.factor
    return f


def arrival_times(spec: ArrivalSpec, duration_s: float, rng: np.random.Generator) -> list[float]:
    """Arrivals in [0, duration_s). Rate changes apply to the gap drawn at each arrival (exact for
    piecewise-constant rates whose pieces are long against the gaps)."""
    assert spec.rate is not None
    out: list[float] = []
    t = 0.0
    period = spec.on_s + spec.off_s
    while True:
        rate = spec.rate * _factor(spec, t)
        if spec.kind == "gamma":
            k = 1.0 / (spec.cv * spec.cv)
            gap = rng.gamma(k, 1.0 / (rate * k))
        else:
            gap = rng.exponential(1.0 / rate)
        t += gap
        if spec.kind == "onoff" and spec.off_s > 0 and (t % period) >= spec.on_s:
            t = (math.floor(t / period) + 1) * period  # silent until the next on phase
            t += rng.exponential(1.0 / rate)
        if t >= duration_s:
            return out
        out.append(t)


#: Longer than any model's context; a bigger count is a broken trace (and would take hours to simulate).
MAX_PROMPT_TOKENS = 10_000_000


def read_trace(path: Path) -> list[dict]:
    """JSONL, one request a line: ``t`` (s, finite, non-decreasing), ``prompt_tokens`` (at most
    MAX_PROMPT_TOKENS), optional ``cached_tokens`` (<= prompt_tokens) and ``prefix`` (the id of
    the cached document)."""
    rows = []
    try:
        lines = read_text(path, SimConfigError).splitlines()
    except SimConfigError as exc:
        raise SimConfigError(f"simulation.arrivals.trace: {exc}") from None
    last = 0.0
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"simulation.arrivals.trace: {path}:{i}"
        try:
            row = loads_finite_json(line)
        except RecursionError:
            raise SimConfigError(f"{where}: not a request (nested too deeply)") from None
        except ValueError as exc:  # JSONDecodeError, NaN/Infinity, an integer of thousands of digits
            raise SimConfigError(f"{where}: not JSON ({str(exc).splitlines()[0]})") from None
        if not isinstance(row, dict):
            raise SimConfigError(f"{where}: each line must be a JSON object")
        for key in ("t", "prompt_tokens"):
            if key not in row:
                raise SimConfigError(f"{where}: missing field {key!r}")
        t, n, c = row["t"], row["prompt_tokens"], row.get("cached_tokens", 0)
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t < math.inf:
            raise SimConfigError(f"{where}: field 't' must be a finite number >= 0, got {t!r}")
        if t < last:
            raise SimConfigError(f"{where}: field 't' runs backwards ({t} after {last})")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_PROMPT_TOKENS:
            raise SimConfigError(
                f"{where}: field 'prompt_tokens' must be an integer in 1..{MAX_PROMPT_TOKENS}, got {n!r}"
            )
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= n:
            raise SimConfigError(f"{where}: field 'cached_tokens' must be an integer in 0..prompt_tokens, got {c!r}")
        last = float(t)
        rows.append({"t": float(t), "prompt_tokens": n, "cached_tokens": c, "prefix": str(row.get("prefix", "shared"))})
    if not rows:
        raise SimConfigError(f"simulation.arrivals.trace: {path} holds no requests")
    return rows


def make_requests(sim: SimulationSpec, dist: LengthDistribution, base_dir: Path) -> list[SimRequest]:
    """The whole request stream, drawn once so every deployment sees the same requests."""
    rng = np.random.default_rng(sim.seed)
    if sim.arrivals.kind == "trace":
        path = Path(sim.arrivals.trace or "")
        if not path.is_absolute():
            path = base_dir / path
        reqs = []
        for i, row in enumerate(read_trace(path)):
            if row["t"] >= sim.duration_s:
                break
            c = row["cached_tokens"]
            segs = [(f"p{row['prefix']}", c), (f"r{i}", row["prompt_tokens"] - c)]
            reqs.append(SimRequest(i, row["t"], Prompt(segs), warm_prefix=c))
        return reqs
    times = arrival_times(sim.arrivals, sim.duration_s, rng)
    n = len(times)
    lengths = np.maximum(1, np.rint(_sample_lengths(dist, n, rng))).astype(int)
    px = sim.prefix
    with_doc = rng.random(n) < px.share
    ranks = np.arange(1, px.documents + 1, dtype=float)
    weights = ranks**-px.zipf_s
    docs = rng.choice(px.documents, size=n, p=weights / weights.sum())
    reqs = []
    for i, t in enumerate(times):
        segs = [(f"d{docs[i]}", px.doc_tokens)] if with_doc[i] else []
        segs.append((f"r{i}", int(lengths[i])))
        reqs.append(SimRequest(i, float(t), Prompt(segs)))
    return reqs
