"""The demo workload: the paper's distribution, scaled, and prompts of the asked lengths."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prfaas_plugin.demo.report import DemoReport, RequestRecord
from prfaas_plugin.demo.workload import WorkloadSpec, build_prompts, sample_lengths


def _truncated_lognormal_mean(mu: float, sigma: float, lo: float, hi: float) -> float:
    x = np.linspace(math.log(lo), math.log(hi), 200_001)
    pdf = np.exp(-((x - mu) ** 2) / (2 * sigma**2))
    return float(np.trapezoid(np.exp(x) * pdf, x) / np.trapezoid(pdf, x))


def test_lengths_are_reproducible_bounded_and_have_the_right_mean() -> None:
    spec = WorkloadSpec(num_requests=4000, scale=1 / 64, min_tokens=16, max_tokens=2048, seed=3)
    a, b = sample_lengths(spec), sample_lengths(spec)
    assert a == b
    assert min(a) >= 16 and max(a) <= 2048
    expect = _truncated_lognormal_mean(spec.mu + math.log(spec.scale), spec.sigma, 16, 2048)
    assert abs(np.mean(a) - expect) / expect < 0.05
    assert sample_lengths(WorkloadSpec(num_requests=50, seed=4)) != sample_lengths(
        WorkloadSpec(num_requests=50, seed=5)
    )


def test_prompts_hit_their_target_lengths_and_share_prefixes() -> None:
    count = lambda s: len(s.split())  # noqa: E731 - a stand-in tokenizer: one token per word
    spec = WorkloadSpec(num_requests=30, shared_prefix_fraction=0.5, seed=1)
    prompts = build_prompts(spec, count)
    for p in prompts:
        assert count(p.text) == p.target_tokens or (p.extends is not None and count(p.text) >= p.target_tokens)
    extended = [p for p in prompts if p.extends is not None]
    assert extended, "with fraction 0.5 some prompts must extend earlier ones"
    for p in extended:
        assert p.text.startswith(prompts[p.extends].text)
    firsts = {p.text.split()[0] for p in prompts if p.extends is None}
    assert len(firsts) == sum(p.extends is None for p in prompts)


def test_bad_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="min_tokens"):
        WorkloadSpec(min_tokens=100, max_tokens=50)
    with pytest.raises(ValueError, match="num_requests"):
        WorkloadSpec(num_requests=0)


def test_report_totals_json_and_figure(tmp_path) -> None:
    recs = [
        RequestRecord("r1", "prfaas", 1000, 900, 500, 8 << 20, 0.05, 0.2, 0.4, 0.0, True),
        RequestRecord("r2", "local", 200, 200, 500, 0, None, 0.05, 0.2, 0.1, True),
        RequestRecord("r3", "local", 300, 100, 500, 0, None, 0.05, 0.2, 0.2, False),
    ]
    rep = DemoReport(
        link={"rate_gbit": 1.0, "rtt_ms": 20}, requests=recs, threshold_timeline=[(0.0, 500.0)], wall_s=2.0
    )
    t = rep.totals()
    assert t["offload_fraction"] == pytest.approx(1 / 3, abs=1e-3)
    assert t["egress_gbit_per_s"] == pytest.approx((8 << 20) * 8 / 2.0 / 1e9, rel=1e-4)
    assert t["all_outputs_equal"] is False
    assert t["routes_used"] == ["local", "prfaas"]
    jpath, ppath = rep.write(tmp_path)
    assert jpath.read_text().startswith("{") and ppath.stat().st_size > 10_000
    assert "NO" in rep.table()
