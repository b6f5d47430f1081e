"""prfaas simulate: the model against the planner at saturation, the link, the router's code in
the loop, and config errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import simpy
import yaml

from prfaas_plugin.fleet.prefix_index import PrefixIndex
from prfaas_plugin.router import policy
from prfaas_plugin.sim import SimConfigError, load_simulation, run_all
from prfaas_plugin.sim.link import SharedLink
from prfaas_plugin.sim.run import planned_rates
from prfaas_plugin.sim.workload import Prompt

CASE = Path(__file__).resolve().parents[1] / "examples" / "planner" / "case_study.yaml"


def _load(**over):
    return load_simulation(CASE, {f"simulation.{k}": v for k, v in over.items()})


def test_saturated_throughput_and_egress_match_the_planner():
    """Arrivals above every deployment's Lambda_max: each completes what the planner says it can
    (the overload fallback is off -- the planner's model routes by t alone)."""
    cfg, sim, base = _load(
        duration_s=1500, warmup_s=300, queue_high=10**6, deployments=["prfaas_pd", "homogeneous", "naive"]
    )
    sim = sim.model_copy(update={"arrivals": sim.arrivals.model_copy(update={"rate": 5.0})})
    result, runs = run_all(cfg, sim, base)
    planned = planned_rates(result)
    for name, r in runs.items():
        lam, egress = planned[name]
        assert r.throughput_rps == pytest.approx(lam, rel=0.05), name
        if egress:
            assert r.egress_gbps == pytest.approx(egress, rel=0.05), name


def test_ordering_below_saturation():
    cfg, sim, base = _load(duration_s=900, warmup_s=150, deployments=["prfaas_pd", "homogeneous"])
    _result, runs = run_all(cfg, sim, base)
    pd, homo = runs["prfaas_pd"].summary()["ttft"], runs["homogeneous"].summary()["ttft"]
    assert runs["prfaas_pd"].throughput_rps == pytest.approx(2.0, rel=0.1)
    assert pd["mean_s"] < homo["mean_s"] and pd["p90_s"] < homo["p90_s"]
    assert 0.3 < runs["prfaas_pd"].offload_share < 0.7


def test_the_router_policy_is_in_the_loop(monkeypatch):
    """Patching the router's decide() changes the simulation: nothing is offloaded."""
    real = policy.decide
    monkeypatch.setattr(policy, "decide", lambda *a, **k: real(*a, **{**k, "exclude_prfaas": True}))
    cfg, sim, base = _load(duration_s=300, warmup_s=60, deployments=["prfaas_pd"])
    _r, runs = run_all(cfg, sim, base)
    assert runs["prfaas_pd"].offload_share == 0.0
    assert runs["prfaas_pd"].egress_gbps == 0.0


def test_shared_link_fair_share_overlap_and_dip():
    env = simpy.Environment()
    link = SharedLink(env, gbps=8.0, trace=[(10.0, 4.0)])  # 1 GB/s, then 0.5 GB/s from t=10
    done = {}

    def flow(name, start, nbytes, produce_s):
        yield env.timeout(start)
        yield link.send(nbytes, produce_s)
        done[name] = env.now

    env.process(flow("a", 0, 1e9, 0))  # alone 1 s, then shares
    env.process(flow("b", 0.5, 1e9, 0))
    env.process(flow("c", 5, 1e9, 4))  # produced over 4 s: capped at 0.25 GB/s, finishes with its prefill
    env.process(flow("d", 10, 1e9, 0))  # at 0.5 GB/s: 2 s
    env.run(until=20)
    assert done["a"] == pytest.approx(1.5)  # 0.5 GB alone, then 0.5 GB at half rate
    assert done["b"] == pytest.approx(2.0)
    assert done["c"] == pytest.approx(9.0)
    assert done["d"] == pytest.approx(12.0)
    assert link.sent_bits == pytest.approx(4 * 8e9)


def test_prompts_hash_by_content_in_the_router_index():
    idx = PrefixIndex(1024)
    a = Prompt([("doc7", 5000), ("r1", 3000)])
    b = Prompt([("doc7", 5000), ("r2", 100)])
    idx.record("x", a)
    assert idx.longest_prefix(b, ["x"]) == (4096, "x")
    assert idx.longest_prefix(Prompt([("doc8", 5000)]), ["x"]) == (0, None)


def test_prefix_skew_is_found_by_the_router_index():
    cfg, sim, base = _load(duration_s=600, warmup_s=100, deployments=["prfaas_pd"])
    _r, plain = run_all(cfg, sim, base)
    skew = {"share": 0.8, "documents": 4, "doc_tokens": 60000, "zipf_s": 1.2}
    cfg2, sim2, base2 = _load(duration_s=600, warmup_s=100, deployments=["prfaas_pd"], prefix=skew)
    _r, hit = run_all(cfg2, sim2, base2)
    assert plain["prfaas_pd"].cached_share == 0.0
    # 80% of requests carry one of 4 documents of 60K tokens (about 2/3 of their prompt): after
    # the first reads the router finds most of those tokens cached
    assert hit["prfaas_pd"].cached_share > 0.4


def test_trace_replay(tmp_path):
    trace = tmp_path / "t.jsonl"
    rows = [{"t": 0.5 * i, "prompt_tokens": 40000 if i % 2 else 2000, "cached_tokens": 0} for i in range(200)]
    trace.write_text("\n".join(json.dumps(r) for r in rows))
    arrivals = {"kind": "trace", "trace": str(trace)}
    cfg, sim, base = _load(duration_s=100, warmup_s=10, deployments=["prfaas_pd"], arrivals=arrivals)
    _r, runs = run_all(cfg, sim, base)
    r = runs["prfaas_pd"]
    assert r.offload_share == pytest.approx(0.5, abs=0.02)  # 40K above t (19.3K), 2K below
    assert np.all(r.ttft_by_route["prfaas"] > 1.0)


def _write(tmp_path, section) -> Path:
    raw = yaml.safe_load(CASE.read_text())
    raw["simulation"] = section
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"arrivals": {"kind": "poisson", "rate": -1}}, "simulation.arrivals.rate"),
        ({"link_trace": [{"at_s": 10, "gbps": 20}, {"at_s": 5, "gbps": 100}]}, "link_trace[1].at_s"),
        ({"duration_s": 10, "warmup_s": 20}, "warmup_s"),
        ({"bogus": 1}, "simulation.bogus"),
    ],
)
def test_bad_config_names_the_field(tmp_path, section, field):
    with pytest.raises(SimConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        load_simulation(_write(tmp_path, section))


def test_trace_missing_field(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"t": 0, "prompt_tokens": 10}\n{"t": 1}\n')
    cfg, sim, base = load_simulation(_write(tmp_path, {"arrivals": {"kind": "trace", "trace": str(trace)}}))
    with pytest.raises(SimConfigError, match=r"t.jsonl:2: missing field 'prompt_tokens'"):
        run_all(cfg, sim, base)


def test_the_planner_ignores_the_simulation_section():
    from prfaas_plugin.planner import load_config

    cfg, _ = load_config(CASE)
    assert cfg.simulation is not None


@pytest.mark.parametrize(
    ("arrivals", "rate"),
    [
        ({"kind": "poisson", "rate": 4.0}, 4.0),
        ({"kind": "gamma", "rate": 4.0, "cv": 3.0}, 4.0),
        ({"kind": "onoff", "rate": 4.0, "on_s": 10, "off_s": 30}, 1.0),
        ({"kind": "poisson", "rate": 1.0, "changes": [{"at_s": 0, "duration_s": 500, "factor": 3}]}, 2.0),
    ],
)
def test_arrival_processes(arrivals, rate):
    from prfaas_plugin.sim.config import ArrivalSpec
    from prfaas_plugin.sim.workload import arrival_times

    times = np.array(arrival_times(ArrivalSpec(**arrivals), 1000.0, np.random.default_rng(3)))
    assert len(times) / 1000.0 == pytest.approx(rate, rel=0.12)
    assert np.all(np.diff(times) >= 0)
    if arrivals["kind"] == "onoff":
        assert np.all(times % 40 < 10)


def test_cli_reports_a_bad_config(tmp_path):
    from click.testing import CliRunner

    from prfaas_plugin.cli.simulate import command

    res = CliRunner().invoke(command, [str(_write(tmp_path, {"arrivals": {"kind": "poisson", "rate": 0}}))])
    assert res.exit_code == 1
    assert "simulation.arrivals.rate" in res.output


def test_cli_writes_summary_and_plots(tmp_path):
    from click.testing import CliRunner

    from prfaas_plugin.cli.simulate import command

    cfg = _write(tmp_path, {"duration_s": 120, "warmup_s": 20, "deployments": ["prfaas_pd", "naive"]})
    res = CliRunner().invoke(command, [str(cfg), "--out", str(tmp_path / "o"), "--no-progress"])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert set(data["deployments"]) == {"prfaas_pd", "naive"}
    assert {p.name for p in (tmp_path / "o").glob("*.png")} == {
        "ttft_cdf.png",
        "egress.png",
        "offload_threshold.png",
        "queues.png",
    }


def _cli_fails(args: list[str], *needles: str) -> str:
    from cli_helpers import cli_fails

    from prfaas_plugin.cli.simulate import command

    return cli_fails(command, args, *needles)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"t": NaN, "prompt_tokens": 100}', "t.jsonl:2: not JSON (NaN"),
        ('{"t": Infinity, "prompt_tokens": 100}', "t.jsonl:2: not JSON (Infinity"),
        ('{"t": "soon", "prompt_tokens": 100}', "t.jsonl:2: field 't' must be a finite number"),
        ('{"t": true, "prompt_tokens": 100}', "t.jsonl:2: field 't' must be a finite number"),
        ('{"t": 1, "prompt_tokens": 1' + "0" * 5000 + "}", "t.jsonl:2: not JSON"),
        ('{"t": 1, "prompt_tokens": 100000000000}', "t.jsonl:2: field 'prompt_tokens' must be an integer in"),
        ("[" * 100_000, "t.jsonl:2: not a request (nested too deeply)"),
    ],
)
def test_bad_trace_lines_are_named(tmp_path, line, message):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"t": 0, "prompt_tokens": 10}\n' + line + "\n")
    section = {"duration_s": 60, "warmup_s": 10, "deployments": ["prfaas_pd"]}
    cfg = _write(tmp_path, {**section, "arrivals": {"kind": "trace", "trace": str(trace)}})
    _cli_fails([str(cfg), "--no-progress", "--no-plots", "--out", str(tmp_path / "o")], "Error: ", message)


def test_trace_that_is_a_folder_or_not_utf8(tmp_path):
    bad = tmp_path / "bin.jsonl"
    bad.write_bytes(b"\xff\n")
    for trace, message in ((tmp_path, "is a directory"), (bad, "not UTF-8")):
        cfg = _write(tmp_path, {"arrivals": {"kind": "trace", "trace": str(trace)}})
        _cli_fails([str(cfg), "--no-progress", "--out", str(tmp_path / "o")], "simulation.arrivals.trace", message)


def test_bins_that_would_not_fit_are_refused_up_front(tmp_path):
    cfg = _write(tmp_path, {"duration_s": 3600, "bin_s": 1e-9})
    _cli_fails([str(cfg), "--no-progress", "--out", str(tmp_path / "o")], "bin_s", "bins")


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"duration_s": 60, "warmup_s": 10, "bin_s": float("inf")}, "bin_s"),
        ({"duration_s": 60, "warmup_s": 10, "bin_s": 120}, "bin_s"),
        ({"arrivals": {"kind": "poisson", "rate": float("inf")}}, "simulation.arrivals.rate"),
        ({"duration_s": float("nan")}, "simulation.duration_s"),
    ],
)
def test_non_finite_or_oversized_values_are_refused(tmp_path, section, field):
    _cli_fails([str(_write(tmp_path, section)), "--no-progress", "--out", str(tmp_path / "o")], field)
