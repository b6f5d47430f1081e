"""prfaas simulate replaying a real run: the measured whole-path service times, the router's
clock phase, the demo's calibration summary and the validator's clock offset rule."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from prfaas_plugin.demo.calibrate import summarise
from prfaas_plugin.demo.run import _planner_config
from prfaas_plugin.demo.workload import WorkloadSpec
from prfaas_plugin.sim import SimConfigError, load_simulation
from prfaas_plugin.sim.config import MeasuredPath
from prfaas_plugin.sim.model import Deployment, simulate_deployment
from prfaas_plugin.sim.workload import make_requests

BENCH = Path(__file__).resolve().parents[1] / "bench"

PATH = {
    "lengths": [64, 256, 768, 1600],
    "local_ttft_s": [0.10, 0.12, 0.20, 0.30],
    "prfaas_producer_s": [0.05, 0.07, 0.15, 0.25],
    "prfaas_ttft_s": [0.20, 0.22, 0.32, 0.45],
    "decode_step_s": 0.01,
}


PROFILE = [0.01, 0.02, 0.03, 0.04]  # T_prefill of both engines' profiles at PATH's lengths


def _demo_sim(tmp_path: Path, rows: list[dict], t_local: list[float] = PROFILE, **sim) -> tuple:
    """The demo's deployment (one PrfaaS engine, one local engine that prefills and decodes) from
    the planner config the demo itself writes, replaying ``rows``."""
    lengths = [64, 256, 768, 1600]
    _planner_config(
        tmp_path / "planner.yaml",
        lengths,
        PROFILE,
        t_local,
        [0.1, 0.15, 0.3, 0.5],
        1.0,
        WorkloadSpec(max_tokens=1900),
    )
    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join(json.dumps(r) for r in rows))
    raw = yaml.safe_load((tmp_path / "planner.yaml").read_text())
    raw["simulation"] = {
        "duration_s": 60,
        "warmup_s": 0,
        "arrivals": {"kind": "trace", "trace": str(trace)},
        "block_tokens": 16,
        "bin_s": 1.0,
        **sim,
    }
    (tmp_path / "planner.yaml").write_text(yaml.safe_dump(raw))
    cfg, spec, base = load_simulation(tmp_path / "planner.yaml")
    return cfg, spec, make_requests(spec, cfg.length_distribution(base), base)


def _fixed(cfg, spec, requests, t: float):
    return simulate_deployment(Deployment("demo", 1, 0, 0, "fixed", t, n_both=1), cfg, spec, requests)


def test_measured_path_interpolates_and_extrapolates():
    p = MeasuredPath(**PATH)
    assert p.at("local_ttft_s", 256) == pytest.approx(0.12)
    assert p.at("local_ttft_s", 512) == pytest.approx(0.16)
    assert p.at("prfaas_ttft_s", 2016) == pytest.approx(0.45 + 0.13 * 416 / 832)  # the outer pair's slope
    assert p.at("local_ttft_s", 0) == pytest.approx(0.10 - 0.02 * 64 / 192)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"lengths": [64, 64, 768, 1600]}, "lengths"),
        ({"local_ttft_s": [0.1, 0.2]}, "local_ttft_s"),
        ({"prfaas_ttft_s": [0.2, 0.0, 0.3, 0.4]}, "prfaas_ttft_s"),
        ({"decode_step_s": -1}, "decode_step_s"),
    ],
)
def test_bad_measured_path_names_the_field(tmp_path, change, words):
    with pytest.raises(SimConfigError) as exc:
        _demo_sim(tmp_path, [{"t": 0, "prompt_tokens": 100}], measured_path={**PATH, **change})
    assert "measured_path" in str(exc.value) and words in str(exc.value)


def test_lone_requests_take_the_measured_times(tmp_path):
    rows = [{"t": 0.0, "prompt_tokens": 512}, {"t": 10.0, "prompt_tokens": 1000}]
    cfg, spec, reqs = _demo_sim(tmp_path, rows, measured_path=PATH)
    r = _fixed(cfg, spec, reqs, 700)
    assert list(r.route) == [0, 1]
    assert r.ttft_by_route["local"][0] == pytest.approx(0.16)
    p = MeasuredPath(**PATH)
    assert r.ttft_by_route["prfaas"][0] == pytest.approx(p.at("prfaas_ttft_s", 1000), rel=1e-6)
    # without the measured path the same requests take the profile's (much shorter) times
    cfg, spec, reqs = _demo_sim(tmp_path, rows)
    plain = _fixed(cfg, spec, reqs, 700)
    assert plain.ttft_by_route["local"][0] < 0.1


def test_only_prefill_compute_holds_an_instance(tmp_path):
    """Of a measured time, only the profile's T_prefill holds the engine (it batches the rest):
    a second local request waits only for the first's compute; two offloaded requests together
    overlap their handshakes; an offloaded request's first decode step waits for a local prefill
    in progress on its decode instance."""
    p = MeasuredPath(**PATH)
    rows = [{"t": 0.0, "prompt_tokens": 512}, {"t": 0.001, "prompt_tokens": 512}]
    cfg, spec, reqs = _demo_sim(tmp_path, rows, measured_path=PATH)
    r = _fixed(cfg, spec, reqs, 700)
    t_prefill = 0.025  # the profile at 512 tokens
    assert sorted(r.ttft_by_route["local"]) == pytest.approx([0.16, 0.16 + t_prefill - 0.001])
    rows = [{"t": 0.0, "prompt_tokens": 1000}, {"t": 0.0, "prompt_tokens": 1000}]
    cfg, spec, reqs = _demo_sim(tmp_path, rows, measured_path=PATH)
    r = _fixed(cfg, spec, reqs, 700)
    lone = p.at("prfaas_ttft_s", 1000)
    t_prefill = 0.03 + 0.01 * 232 / 832
    assert sorted(r.ttft_by_route["prfaas"]) == pytest.approx([lone, lone + t_prefill], rel=1e-6)
    # a local prefill whose compute is all of its 0.8 s holds the decode instance's first step
    slow = [0.5, 0.6, 0.8, 1.0]
    slow_local = {**PATH, "local_ttft_s": slow}
    rows = [{"t": 0.0, "prompt_tokens": 1000}, {"t": 0.0, "prompt_tokens": 1600}]
    cfg, spec, reqs = _demo_sim(tmp_path, rows, t_local=slow, measured_path=slow_local)
    r = _fixed(cfg, spec, reqs, 1200)  # 1000 stays local, 1600 goes to PrfaaS
    assert list(r.route) == [0, 1]
    local = MeasuredPath(**slow_local).at("local_ttft_s", 1000)
    assert p.at("prfaas_ttft_s", 1600) < local
    assert r.ttft_by_route["prfaas"][0] == pytest.approx(local + p.decode_step_s)


def _reopt_marks(tmp_path, clock):
    rows = [{"t": 0.01 * i, "prompt_tokens": 1500} for i in range(5)]
    ctl = {"reoptimize_every_s": 2.0, "min_samples": 4, "apply_split": False}
    sim = {"controller": ctl, "start_threshold": 256, "measured_path": PATH}
    if clock:
        sim["router_clock"] = clock
    cfg, spec, reqs = _demo_sim(tmp_path, rows, **sim)
    r = simulate_deployment(Deployment("demo", 1, 0, 0, "online", 256, n_both=1), cfg, spec, reqs)
    return [t for t, _v, why in r.threshold_timeline if why.startswith("re-optimised")]


def test_the_router_clock_sets_when_the_controller_reoptimises(tmp_path):
    """The router re-optimised at 3.0 s on its clock and the trace began at its 0.7 s: the
    simulated controller re-optimises at 1.0 s router time (0.3 s into the trace), not at 2 s."""
    assert _reopt_marks(tmp_path, None)[0] == pytest.approx(2.0)
    marks = _reopt_marks(tmp_path, {"at_start_s": 0.7, "tick_at_s": 3.0, "reoptimised_at_s": 3.0})
    assert marks[0] == pytest.approx(0.3)


def test_calibration_summary():
    samples = {
        "local": {64: [{"ttft_s": t, "total_s": t + 0.11} for t in (0.1, 0.3, 0.2)]},
        "prfaas": {64: [{"ttft_s": t, "total_s": t + 0.22, "producer_s": t / 2} for t in (0.4, 0.5, 0.6)]},
    }
    cal = summarise(samples, [64], 12, 3)
    assert cal["local"]["ttft_s"] == [pytest.approx(0.2)]
    assert cal["prfaas"]["ttft_s"] == [pytest.approx(0.5)] and cal["prfaas"]["producer_s"] == [pytest.approx(0.25)]
    assert cal["tpot_s"] == pytest.approx(0.015)  # the median of 0.01 (local) and 0.02 (prfaas) steps
    with pytest.raises(ValueError, match="lengths \\[256\\]"):
        summarise(samples, [64, 256], 12, 3)
    with pytest.raises(ValueError, match="2 output tokens"):
        summarise(samples, [64], 1, 3)


#: a calibration's medians (demo/calibrate.py ``summarise``), for the validator's conversion
CAL_MEDIANS = {
    "lengths": [64, 256],
    "tpot_s": 0.003,
    "local": {"ttft_s": [0.02, 0.04]},
    "prfaas": {"ttft_s": [0.2, 0.3], "producer_s": [0.1, 0.1]},
}


def _sim_validate(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("sim_validate", None)
    import sim_validate

    return sim_validate


def test_router_offset_agrees_with_the_thresholds_answers_carried(monkeypatch):
    sim_validate = _sim_validate(monkeypatch)
    decided = [(1.0, 256), (2.2, 256), (2.5, 360), (4.2, 360), (4.5, 576)]
    report = {
        "workload_t0_wall": 1000.0,
        "threshold_timeline": [(0.0, 256.0), (3.0, 360.0), (5.0, 576.0)],
        "threshold_reasons": ["start", "re-optimised on 4 observed lengths", "re-optimised on 8 observed lengths"],
        "requests": [{"threshold_tokens": t, "router": {"started_at": 1000.0 + d}} for d, t in decided],
    }
    off, bad = sim_validate.router_offset(report)
    assert bad == 0 and off == pytest.approx(0.65, abs=0.002)  # (0.5, 0.8]: 2.5 + x > 3 >= 2.2 + x
    clock = sim_validate.router_clock(report)
    assert clock == {"at_start_s": pytest.approx(0.65, abs=0.002), "tick_at_s": 3.0, "reoptimised_at_s": 3.0}
    assert sim_validate.router_offset({**report, "workload_t0_wall": None}) is None
    assert np.isfinite(off)


def test_requests_draw_from_the_measured_spread(tmp_path):
    """With a spread, lone requests take the median times scaled by the measured ratios; without
    one, all take the median."""
    rows = [{"t": 1.0 * i, "prompt_tokens": 512} for i in range(40)]
    spread = {**PATH, "local_spread": [1.0, 3.0]}
    cfg, spec, reqs = _demo_sim(tmp_path, rows, measured_path=spread)
    got = _fixed(cfg, spec, reqs, 700).ttft_by_route["local"]
    assert set(np.round(got, 6)) == {0.16, 0.48}
    cfg, spec, reqs = _demo_sim(tmp_path, rows, measured_path=PATH)
    assert set(np.round(_fixed(cfg, spec, reqs, 700).ttft_by_route["local"], 6)) == {0.16}
    # PrfaaS: the producer's hold and the TTFT scale as a measured pair
    rows = [{"t": 1.0 * i, "prompt_tokens": 1000} for i in range(40)]
    cfg, spec, reqs = _demo_sim(tmp_path, rows, measured_path={**PATH, "prfaas_spread": [(1.0, 1.0), (2.0, 2.0)]})
    got = _fixed(cfg, spec, reqs, 700).ttft_by_route["prfaas"]
    t = MeasuredPath(**PATH).at("prfaas_ttft_s", 1000)
    assert set(np.round(got, 6)) == {round(t, 6), round(2 * t, 6)}


def test_calibration_becomes_a_measured_path(monkeypatch):
    sim_validate = _sim_validate(monkeypatch)
    cal = {
        **CAL_MEDIANS,
        "samples": {
            "local": {"64": [{"ttft_s": 0.02}, {"ttft_s": 0.04}], "256": [{"ttft_s": 0.04}]},
            "prfaas": {"64": [{"ttft_s": 0.4, "producer_s": 0.1}], "256": [{"ttft_s": 0.3, "producer_s": 0.3}]},
        },
    }
    p = MeasuredPath(**sim_validate.measured_path(cal))
    assert p.local_spread == [1.0, 2.0, 1.0]
    assert p.prfaas_spread == [(1.0, 2.0), (pytest.approx(3.0), 1.0)]
    assert p.decode_step_s == 0.003


def test_a_request_arriving_while_another_is_open_draws_from_the_busy_spread(tmp_path):
    rows = [{"t": 0.0, "prompt_tokens": 512}, {"t": 0.05, "prompt_tokens": 512}, {"t": 10.0, "prompt_tokens": 512}]
    path = {**PATH, "local_spread": [1.0], "local_spread_busy": [2.0]}
    cfg, spec, reqs = _demo_sim(tmp_path, rows, measured_path=path)
    r = _fixed(cfg, spec, reqs, 700)
    assert list(np.round(r.ttft_by_route["local"], 6)) == [0.16, 0.32, 0.16]
    with pytest.raises(SimConfigError, match="local_spread_busy"):
        _demo_sim(tmp_path, rows, measured_path={**path, "local_spread_busy": [0.0]})


def test_an_offloaded_request_arriving_while_another_is_offloaded_draws_from_the_pair_spread(tmp_path):
    """Two offloaded requests open at once: the second draws from the pair spread; an offloaded
    request beside a local one from the busy spread; a lone one from the lone spread."""
    rows = [
        {"t": 0.0, "prompt_tokens": 1000},  # lone
        {"t": 10.0, "prompt_tokens": 1000},
        {"t": 10.1, "prompt_tokens": 1000},  # arrives while the one above is offloaded
        {"t": 20.0, "prompt_tokens": 100},  # local (under t)
        {"t": 20.01, "prompt_tokens": 1000},  # arrives while only a local request is open
    ]
    path = {
        **PATH,
        "prfaas_spread": [(1.0, 1.0)],
        "prfaas_spread_busy": [(1.0, 2.0)],
        "prfaas_spread_pair": [(1.0, 3.0)],
    }
    cfg, spec, reqs = _demo_sim(tmp_path, rows, measured_path=path)
    r = _fixed(cfg, spec, reqs, 700)
    t = MeasuredPath(**PATH).at("prfaas_ttft_s", 1000)
    assert list(np.round(r.ttft_by_route["prfaas"] / t, 3)) == [1.0, 1.0, 3.0, 2.0]
    # without a pair spread, the busy one stands in
    cfg, spec, reqs = _demo_sim(tmp_path, rows, measured_path={**path, "prfaas_spread_pair": []})
    r = _fixed(cfg, spec, reqs, 700)
    assert list(np.round(r.ttft_by_route["prfaas"] / t, 3)) == [1.0, 1.0, 2.0, 2.0]
    with pytest.raises(SimConfigError, match="prfaas_spread_pair"):
        _demo_sim(tmp_path, rows, measured_path={**path, "prfaas_spread_pair": [(1.0, -1.0)]})


def test_a_local_request_arriving_while_another_local_one_is_open_draws_from_the_local_pair_spread(tmp_path):
    rows = [
        {"t": 0.0, "prompt_tokens": 512},  # lone
        {"t": 10.0, "prompt_tokens": 512},
        {"t": 10.02, "prompt_tokens": 512},  # beside the local one above
        {"t": 20.0, "prompt_tokens": 1000},  # offloaded (over t)
        {"t": 20.01, "prompt_tokens": 512},  # beside an offloaded one only
    ]
    path = {**PATH, "local_spread": [1.0], "local_spread_busy": [2.0], "local_spread_pair": [3.0]}
    cfg, spec, reqs = _demo_sim(tmp_path, rows, measured_path=path)
    got = _fixed(cfg, spec, reqs, 700).ttft_by_route["local"] / MeasuredPath(**PATH).at("local_ttft_s", 512)
    assert list(np.round(got, 2)) == [1.0, 1.0, 3.0, 2.0]
    with pytest.raises(SimConfigError, match="local_spread_pair"):
        _demo_sim(tmp_path, rows, measured_path={**path, "local_spread_pair": [0.0]})


def test_calibration_pair_samples_become_the_pair_spreads(monkeypatch):
    sim_validate = _sim_validate(monkeypatch)
    cal = {
        **CAL_MEDIANS,
        "samples": {"local": {"64": [{"ttft_s": 0.02}]}, "prfaas": {"64": [{"ttft_s": 0.2, "producer_s": 0.1}]}},
        "pair_samples": {"prfaas": {"256": [{"ttft_s": 0.6, "producer_s": 0.2}]}},
    }
    p = MeasuredPath(**sim_validate.measured_path(cal))
    assert p.prfaas_spread_pair == [(pytest.approx(2.0), pytest.approx(2.0))]
    assert p.prfaas_spread_busy == p.local_spread_busy == p.local_spread_pair == []
    cal["pair_samples"]["local"] = {"64": [{"ttft_s": 0.05}]}
    assert MeasuredPath(**sim_validate.measured_path(cal)).local_spread_pair == [pytest.approx(2.5)]
