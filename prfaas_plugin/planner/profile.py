"""Per-instance hardware profiles: T_prefill(l) seconds and S_kv(l) MiB from measured tables.

Interpolation rules (stated because the search evaluates lengths between and beyond the points):
- ``linear``: piecewise linear between points; outside the table the end segment is extended.
- ``quadratic``: least-squares fit of a + b*l + c*l^2 (fixed cost, linear projections/MLP,
  quadratic attention) used everywhere, inside and outside the table. Prefill time has this
  shape, so the fit is the better interpolant between sparse points; its worst relative
  residual on the table is reported so a bad fit is visible.
Values never go below zero.

A profile may also be *derived* from another one (e.g. an H20 profile from the H200 table, since
the paper publishes only the latter): T' = fixed_ratio * fixed + compute_ratio * (T - fixed),
where ``fixed`` is the fitted constant term of the base's prefill time.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Interp = Literal["linear", "quadratic"]


@dataclass(frozen=True)
class Curve:
    xs: tuple[float, ...]
    ys: tuple[float, ...]
    mode: Interp = "linear"

    def __post_init__(self) -> None:
        if len(self.xs) != len(self.ys):
            raise ValueError("a profile curve needs as many values as lengths")
        if len(self.xs) < 2:
            raise ValueError("a profile table needs at least 2 rows")
        if any(b <= a for a, b in zip(self.xs, self.xs[1:])):
            raise ValueError(f"profile lengths must be strictly increasing, got {list(self.xs)}")
        if any(x <= 0 for x in self.xs) or any(y < 0 for y in self.ys):
            raise ValueError("profile lengths must be > 0 and values >= 0")
        if self.mode == "quadratic" and len(self.xs) < 3:
            raise ValueError("quadratic interpolation needs at least 3 rows")
        fit = tuple(float(v) for v in np.polyfit(np.array(self.xs), np.array(self.ys), 2)) if len(self.xs) >= 3 else ()
        object.__setattr__(self, "_fit", fit)  # cached: the search evaluates curves ~1e4 times

    def coeffs(self) -> tuple[float, ...]:
        """(c, b, a) of the quadratic fit, highest power first."""
        return self._fit  # type: ignore[attr-defined, no-any-return]

    def __call__(self, x: float) -> float:
        if self.mode == "quadratic":
            c, b, a = self.coeffs()
            return max(0.0, a + b * x + c * x * x)
        xs, ys = self.xs, self.ys
        i = 0 if x <= xs[0] else len(xs) - 2 if x >= xs[-1] else bisect.bisect_right(xs, x) - 1
        y = ys[i] + (ys[i + 1] - ys[i]) * (x - xs[i]) / (xs[i + 1] - xs[i])
        return max(0.0, y)

    def fixed_part(self) -> float:
        """Constant term: the quadratic fit's intercept (clamped to [0, min value])."""
        a = float(self.coeffs()[2]) if self.coeffs() else float(self.ys[0])
        return min(max(a, 0.0), min(self.ys))

    def max_fit_error(self) -> float:
        """Worst relative error of the interpolant at the table's own points."""
        return max(abs(self(x) - y) / y for x, y in zip(self.xs, self.ys) if y > 0)


@dataclass(frozen=True)
class Profile:
    """One instance type: prefill time and KV size as functions of the uncached length."""

    name: str
    t_prefill: Curve
    s_kv_mib: Curve
    fixed_ratio: float = 1.0
    compute_ratio: float = 1.0

    def prefill_s(self, tokens: float) -> float:
        t = self.t_prefill(tokens)
        if self.fixed_ratio == 1.0 and self.compute_ratio == 1.0:
            return t
        fixed = self.t_prefill.fixed_part()
        return self.fixed_ratio * fixed + self.compute_ratio * max(0.0, t - fixed)

    def kv_mib(self, tokens: float) -> float:
        return self.s_kv_mib(tokens)

    def derive(self, name: str, compute_ratio: float, fixed_ratio: float) -> Profile:
        if compute_ratio <= 0 or fixed_ratio <= 0:
            raise ValueError("derived profile ratios must be > 0")
        return Profile(
            name, self.t_prefill, self.s_kv_mib, fixed_ratio * self.fixed_ratio, compute_ratio * self.compute_ratio
        )


def table_profile(
    name: str,
    lengths: Sequence[float],
    t_prefill_s: Sequence[float],
    s_kv_mib: Sequence[float],
    t_interp: Interp = "quadratic",
    s_interp: Interp = "linear",
) -> Profile:
    if any(not math.isfinite(v) or v <= 0 for v in (*t_prefill_s, *s_kv_mib)):
        # A prefill takes time and leaves KV behind; zeros make Eqs. 1, 3 and 4 divide by zero.
        raise ValueError("t_prefill_s and s_kv_mib must all be finite and > 0")
    return Profile(
        name,
        Curve(tuple(map(float, lengths)), tuple(map(float, t_prefill_s)), t_interp),
        Curve(tuple(map(float, lengths)), tuple(map(float, s_kv_mib)), s_interp),
    )
