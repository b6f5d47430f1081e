"""Distributions of the *uncached* prefill length L, and the three numbers the model needs of
them for a threshold t: p = P(L > t), l_long = E[L | L > t], l_short = E[L | L <= t].

Both kinds answer exactly (closed form for the truncated log-normal, sorted prefix sums for an
empirical sample), so the grid search is deterministic: no sampling noise can move t.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class LengthDistribution(Protocol):
    @property
    def lo(self) -> float: ...

    @property
    def hi(self) -> float: ...

    def split(self, t: float) -> tuple[float, float, float]:
        """(p, l_long, l_short) for threshold t. l_long (l_short) is nan when p == 0 (p == 1)."""

    def mean(self) -> float: ...


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


@dataclass(frozen=True)
class TruncatedLogNormal:
    """ln L ~ N(mu, sigma^2), truncated to [lo, hi] (the paper: mu 9.90, sigma 1.00, [128, 128K])."""

    mu: float
    sigma: float
    lo: float
    hi: float

    def __post_init__(self) -> None:
        if self.sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if not 0 < self.lo < self.hi:
            raise ValueError(f"need 0 < min < max, got min={self.lo}, max={self.hi}")
        if not self._mass(self.lo, self.hi) > 0:
            raise ValueError(
                f"mu={self.mu}, sigma={self.sigma} puts no probability in [{self.lo:g}, {self.hi:g}] "
                f"(median e^mu = {math.exp(min(self.mu, 700)):.3g}); no lengths remain"
            )

    def _z(self, x: float) -> float:
        return (math.log(x) - self.mu) / self.sigma

    def _mass(self, a: float, b: float) -> float:
        return _phi(self._z(b)) - _phi(self._z(a))

    def _partial_mean_mass(self, a: float, b: float) -> float:
        """E[L; a < L < b] of the untruncated log-normal."""
        s = self.sigma
        return math.exp(self.mu + s * s / 2) * (_phi(self._z(b) - s) - _phi(self._z(a) - s))

    def cdf(self, x: float) -> float:
        x = min(max(x, self.lo), self.hi)
        return self._mass(self.lo, x) / self._mass(self.lo, self.hi)

    def mean(self) -> float:
        return self._partial_mean_mass(self.lo, self.hi) / self._mass(self.lo, self.hi)

    def conditional_mean(self, a: float, b: float) -> float:
        a, b = max(a, self.lo), min(b, self.hi)
        mass = self._mass(a, b)
        return self._partial_mean_mass(a, b) / mass if mass > 0 else float("nan")

    def split(self, t: float) -> tuple[float, float, float]:
        p = 1.0 - self.cdf(t)
        long_ = self.conditional_mean(t, self.hi) if p > 0 else float("nan")
        short = self.conditional_mean(self.lo, t) if p < 1 else float("nan")
        return p, long_, short

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """Inverse-CDF samples (for simulations and demos, never for the planner's search)."""
        from statistics import NormalDist

        rng = np.random.default_rng(seed)
        nd = NormalDist()
        lo, hi = _phi(self._z(self.lo)), _phi(self._z(self.hi))
        u = np.clip(lo + (hi - lo) * rng.random(n), 1e-15, 1 - 1e-15)
        return np.exp(self.mu + self.sigma * np.array([nd.inv_cdf(float(v)) for v in u]))


class Empirical:
    """A sample of observed uncached lengths (a file, or the router's recent requests)."""

    def __init__(self, lengths: Sequence[float]) -> None:
        xs = []
        for x in lengths:
            if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
                raise ValueError(f"lengths must be numbers, got {x!r}")
            if not math.isfinite(x):
                raise ValueError(f"lengths must be finite, got {x!r}")
            xs.append(float(x))
        xs.sort()
        if not xs:
            raise ValueError("an empirical workload needs at least one length")
        if xs[0] < 0:
            raise ValueError(f"lengths must be >= 0, got {xs[0]}")
        if xs[-1] <= 0:
            raise ValueError("every length is 0 (all fully cached): nothing to prefill, nothing to plan")
        self.xs = xs
        self.prefix = np.concatenate([[0.0], np.cumsum(xs)])
        self.lo, self.hi = xs[0], xs[-1]

    @classmethod
    def from_samples(cls, lengths: Sequence[float]) -> Empirical:
        return cls(lengths)

    @classmethod
    def from_file(cls, path: str) -> Empirical:
        """One length per line (blank lines and '#' comments ignored), or a JSON list."""
        import json
        from pathlib import Path

        from prfaas_plugin.yamlconfig import read_text

        text = read_text(Path(path), ValueError)
        if text.lstrip().startswith("["):
            try:
                values = json.loads(text)
            except (ValueError, RecursionError) as exc:
                raise ValueError(f"{path}: not a JSON list of numbers ({exc})") from None
            if not isinstance(values, list):
                raise ValueError(f"{path}: not a JSON list of numbers")
            try:
                return cls(values)
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from None
        vals = []
        for i, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                value = float(line)
            except ValueError:
                raise ValueError(f"{path}:{i}: not a number: {line!r}") from None
            if not math.isfinite(value):
                raise ValueError(f"{path}:{i}: lengths must be finite, got {line!r}")
            vals.append(value)
        return cls(vals)

    def mean(self) -> float:
        return float(self.prefix[-1] / len(self.xs))

    def split(self, t: float) -> tuple[float, float, float]:
        n = len(self.xs)
        k = bisect.bisect_right(self.xs, t)  # k lengths <= t
        p = (n - k) / n
        long_ = float((self.prefix[-1] - self.prefix[k]) / (n - k)) if k < n else float("nan")
        short = float(self.prefix[k] / k) if k > 0 else float("nan")
        return p, long_, short
