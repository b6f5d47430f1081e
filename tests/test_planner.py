"""The planner: distributions, equations on hand-checkable inputs, Table 6, and bad configs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from cli_helpers import cli_fails
from click.testing import CliRunner

from prfaas_plugin.cli import main
from prfaas_plugin.planner import (
    Empirical,
    PlannerConfigError,
    System,
    TruncatedLogNormal,
    evaluate,
    lambda_max,
    load_config,
    plan,
    search_threshold,
    table_profile,
)
from prfaas_plugin.planner.profile import Curve

CASE = Path(__file__).resolve().parents[1] / "examples" / "planner" / "case_study.yaml"


# -- distributions ------------------------------------------------------------------------------
def _numeric(mu, sigma, lo, hi, t):
    x = np.linspace(math.log(lo), math.log(hi), 400_001)
    pdf = np.exp(-((x - mu) ** 2) / (2 * sigma**2))  # density of ln L, unnormalised
    total = np.trapezoid(pdf, x)
    above = x > math.log(t)
    p = np.trapezoid(pdf * above, x) / total
    l_long = np.trapezoid(np.exp(x) * pdf * above, x) / np.trapezoid(pdf * above, x)
    l_short = np.trapezoid(np.exp(x) * pdf * ~above, x) / np.trapezoid(pdf * ~above, x)
    return p, l_long, l_short, np.trapezoid(np.exp(x) * pdf, x) / total


@pytest.mark.parametrize("t", [500.0, 19_400.0, 60_000.0])
def test_truncated_lognormal_moments_match_numerical_integration(t: float) -> None:
    d = TruncatedLogNormal(9.90, 1.00, 128, 131072)
    p, l_long, l_short = d.split(t)
    np_, nl, ns, nmean = _numeric(9.90, 1.00, 128, 131072, t)
    assert p == pytest.approx(np_, rel=1e-4)
    assert l_long == pytest.approx(nl, rel=1e-4)
    assert l_short == pytest.approx(ns, rel=1e-4)
    assert d.mean() == pytest.approx(nmean, rel=1e-4)


def test_paper_distribution_figures() -> None:
    d = TruncatedLogNormal(9.90, 1.00, 128, 131072)
    assert d.mean() == pytest.approx(27_500, rel=0.01)  # paper: mean ~27K
    p, l_long, l_short = d.split(19_400)
    assert p == pytest.approx(0.496, abs=0.002)  # paper: 49.6%
    assert l_long == pytest.approx(45_000, rel=0.01)


def test_empirical_split_is_exact() -> None:
    e = Empirical([100, 200, 300, 400])
    assert e.split(250) == (0.5, 350.0, 150.0)
    p, l_long, l_short = e.split(1000)
    assert p == 0 and math.isnan(l_long) and l_short == 250
    with pytest.raises(ValueError):
        Empirical([])


def test_sampling_follows_the_distribution() -> None:
    d = TruncatedLogNormal(8.0, 0.7, 100, 20000)
    xs = d.sample(20000, seed=1)
    assert xs.min() >= 100 and xs.max() <= 20000
    assert xs.mean() == pytest.approx(d.mean(), rel=0.02)


# -- profiles -------------------------------------------------------------------------------------
def test_linear_interpolation_and_extrapolation() -> None:
    c = Curve((1000.0, 2000.0, 4000.0), (1.0, 2.0, 6.0), "linear")
    assert c(1500) == 1.5 and c(3000) == 4.0
    assert c(5000) == 8.0  # last segment extended
    assert c(0) == 0.0  # first segment extended, clamped at 0


def test_quadratic_fit_is_exact_on_a_quadratic() -> None:
    xs = (1.0, 2.0, 3.0, 4.0)
    c = Curve(xs, tuple(0.5 + 0.1 * x + 0.2 * x * x for x in xs), "quadratic")
    assert c(10.0) == pytest.approx(0.5 + 1.0 + 20.0)
    assert c.fixed_part() == pytest.approx(0.5)
    assert c.max_fit_error() < 1e-9


def test_derived_profile_scales_fixed_and_compute_parts() -> None:
    base = table_profile("b", [1, 2, 3], [1.5, 2.0, 2.5], [1, 2, 3], t_interp="quadratic")  # 1 + 0.5 l
    d = base.derive("d", compute_ratio=3.0, fixed_ratio=2.0)
    assert d.prefill_s(4) == pytest.approx(2.0 * 1.0 + 3.0 * 2.0)


# -- equations on small inputs --------------------------------------------------------------------
def _flat_system(**kw) -> System:
    # T_prefill = l / 1000 s on both types; S_kv = l / 100 MiB.
    prof = table_profile("x", [1000, 2000], [1.0, 2.0], [10.0, 20.0], t_interp="linear")
    args = dict(
        prfaas=prof,
        local=prof,
        n_prfaas=2,
        n_pd=4,
        link_gbps=1000.0,
        bs_max=10,
        t_decode_s=0.05,
        out_tokens=100,
        homogeneous_instances=6,
    )
    args.update(kw)
    return System(**args)


def test_stage_throughputs_by_hand() -> None:
    sys_ = _flat_system()
    e = Empirical([1000, 1000, 3000, 3000])
    op = evaluate(sys_, e, t=2000, n_p=1)
    assert op.p == 0.5 and op.l_long == 3000 and op.l_short == 1000
    assert op.theta_prfaas == pytest.approx(2 / 3.0)  # Eq. 3, compute-bound
    assert op.theta_pd_p == pytest.approx(1 / 1.0)  # Eq. 4
    assert op.theta_pd_d == pytest.approx(3 * 10 / (0.05 * 100))  # Eq. 5
    assert op.lambda_max == pytest.approx(min((2 / 3) / 0.5, 1 / 0.5, 6.0))  # Eq. 6
    # egress = p * Lambda * S_kv(l_long): 0.5 * 4/3 req/s * 30 MiB
    assert op.egress_gbps == pytest.approx(0.5 * (4 / 3) * 30 * 8 * 2**20 / 1e9)


def test_bandwidth_bound_prfaas() -> None:
    sys_ = _flat_system(link_gbps=0.1)
    op = evaluate(sys_, Empirical([3000]), t=2000, n_p=1)
    assert op.theta_prfaas == pytest.approx(0.1e9 / (30 * 8 * 2**20))
    assert op.theta_prfaas_bandwidth < op.theta_prfaas_compute


def test_lambda_max_edges() -> None:
    assert lambda_max(1.0, 2.0, 5.0, 0.0) == 2.0  # nothing offloaded: PrfaaS imposes no limit
    assert lambda_max(1.0, 2.0, 5.0, 1.0) == 1.0


def test_search_balances_eq7_for_a_fixed_split() -> None:
    sys_ = _flat_system(n_pd=10)
    d = TruncatedLogNormal(7.5, 0.8, 100, 20000)
    op = search_threshold(sys_, d, n_p=3, step=10)
    # At the optimum the two prefill paths nearly saturate together (Eq. 7), up to the grid step.
    assert op.prfaas_rate == pytest.approx(op.pd_prefill_rate, rel=0.03)


# -- the paper's case study (Table 6) --------------------------------------------------------------
def test_table6_reproduction() -> None:
    cfg, base = load_config(CASE)
    r = plan(cfg.system(), cfg.length_distribution(base), cfg.search.threshold_step).to_dict()
    assert abs(r["threshold_tokens"] - 19_400) <= 300
    assert abs(r["offload_fraction"] - 0.496) <= 0.01
    assert (r["n_prfaas"], r["n_pd_prefill"], r["n_pd_decode"]) == (4, 3, 5)
    assert r["lambda_max"] == pytest.approx(3.24, rel=0.03)
    assert r["baselines"]["homogeneous"]["lambda_max"] == pytest.approx(2.11, rel=0.03)
    assert (r["baselines"]["homogeneous"]["n_prefill"], r["baselines"]["homogeneous"]["n_decode"]) == (9, 3)
    assert r["baselines"]["naive_heterogeneous"]["lambda_max"] == pytest.approx(2.45, rel=0.03)
    assert r["ratios"]["vs_homogeneous"] == pytest.approx(1.54, abs=0.03)
    assert r["ratios"]["naive_vs_homogeneous"] == pytest.approx(1.16, abs=0.03)
    assert 11.5 <= r["egress_gbps"] <= 14.0  # paper: ~13 Gbps
    assert r["prfaas_bound"] == "compute"
    assert r["ratios"]["cost_normalised_vs_homogeneous"] == pytest.approx(1.15, abs=0.03)


def test_plan_is_deterministic() -> None:
    cfg, base = load_config(CASE)
    a = plan(cfg.system(), cfg.length_distribution(base), 100).to_dict()
    b = plan(cfg.system(), cfg.length_distribution(base), 100).to_dict()
    assert a == b


def test_cli_json_keys_and_plots(tmp_path) -> None:
    res = CliRunner().invoke(main, ["plan", "--config", str(CASE), "--json", "--plot", str(tmp_path)])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    for key in (
        "threshold_tokens",
        "offload_fraction",
        "n_prfaas",
        "n_pd_prefill",
        "n_pd_decode",
        "theta_prfaas",
        "theta_pd_prefill",
        "theta_pd_decode",
        "lambda_max",
        "egress_gbps",
    ):
        assert key in d
    assert "lambda_max" in d["baselines"]["homogeneous"] and "lambda_max" in d["baselines"]["naive_heterogeneous"]
    for png in ("lambda_vs_threshold.png", "lambda_vs_split.png"):
        assert (tmp_path / png).stat().st_size > 20_000


def test_cli_sweep_shows_sensitivity() -> None:
    res = CliRunner().invoke(
        main, ["plan", "--config", str(CASE), "--sweep", "profiles.h20.compute_ratio=2.5,3.7", "--json"]
    )
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)["results"]
    assert rows[0]["threshold_tokens"] > rows[1]["threshold_tokens"]  # slower local prefill -> offload more


# -- bad configs ----------------------------------------------------------------------------------
def _write(tmp_path, mutate) -> Path:
    raw = yaml.safe_load(CASE.read_text())
    mutate(raw)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r["deployment"].pop("pd_instances"), "deployment.pd_instances"),
        (lambda r: r["deployment"].__setitem__("prfaas_instances", -1), "prfaas_instances"),
        (lambda r: r["profiles"]["h200"].__setitem__("lengths", []), "profiles.h200"),
        (lambda r: r["profiles"]["h200"].__setitem__("t_prefill_s", [1, 2, 3]), "same number of rows"),
        (lambda r: r.__setitem__("surprise", 1), "surprise"),
        (lambda r: r["deployment"].__setitem__("pd_profile", "b200"), "'b200' is not defined"),
        (lambda r: r["profiles"]["h200"].__setitem__("lengths", [1024, 1024, 32768, 131072]), "strictly increasing"),
        (lambda r: r["workload"].__setitem__("lengths_file", "x.txt"), "exactly one of"),
        (lambda r: r["link"].__setitem__("gbps", 0), "link.gbps"),
    ],
)
def test_bad_configs_give_clear_errors(tmp_path, mutate, message) -> None:
    path = _write(tmp_path, mutate)
    with pytest.raises(PlannerConfigError, match=message):
        cfg, base = load_config(path)
        cfg.system()
    res = CliRunner().invoke(main, ["plan", "--config", str(path)])
    assert res.exit_code != 0 and "Traceback" not in res.output


def test_lengths_file_workload(tmp_path) -> None:
    lengths = tmp_path / "lengths.txt"
    lengths.write_text(
        "# observed\n" + "\n".join(str(x) for x in TruncatedLogNormal(9.9, 1.0, 128, 131072).sample(5000, 2))
    )
    path = _write(tmp_path, lambda r: r["workload"].update({"lognormal": None, "lengths_file": str(lengths)}))
    cfg, base = load_config(path)
    r = plan(cfg.system(), cfg.length_distribution(base), 100)
    assert abs(r.best.threshold - 19_400) < 2000
    bad = tmp_path / "bad.txt"
    bad.write_text("100\nabc\n")
    path = _write(tmp_path, lambda r: r["workload"].update({"lognormal": None, "lengths_file": str(bad)}))
    cfg, base = load_config(path)
    with pytest.raises(PlannerConfigError, match="bad.txt:2"):
        cfg.length_distribution(base)


# -- inputs the model cannot use: one clear error, non-zero exit, no traceback -------------------
def _cli_fails(args: list[str], *needles: str) -> str:
    return cli_fails(main, args, *needles)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r["deployment"].__setitem__("prfaas_instances", 0), "deployment.prfaas_instances"),
        (lambda r: r["profiles"]["h200"].__setitem__("t_prefill_s", [0, 0, 0, 0]), "profiles.h200"),
        (lambda r: r["profiles"]["h200"].__setitem__("s_kv_mib", [0, 0, 0, 0]), "profiles.h200"),
        (lambda r: r["workload"]["lognormal"].__setitem__("mu", 100), "no lengths remain"),
        (lambda r: r["deployment"].__setitem__("gpu_price_per_hour", {"h200": 0, "h20": 1}), "gpu_price_per_hour"),
        (lambda r: r["search"].__setitem__("threshold_step", float("inf")), "search.threshold_step"),
        (lambda r: r["search"].__setitem__("threshold_step", 0.01), "search.threshold_step"),
        (lambda r: r["workload"]["lognormal"].__setitem__("mu", float("nan")), "workload.lognormal.mu"),
        (lambda r: r["deployment"].__setitem__("pd_instances", 1_000_000), "deployment.pd_instances"),
        (lambda r: r["deployment"].__setitem__("pd_instances", 5000), "evaluations"),
    ],
)
def test_unusable_values_are_refused(tmp_path, mutate, message) -> None:
    path = _write(tmp_path, mutate)
    _cli_fails(["plan", "--config", str(path)], message)
    _cli_fails(["simulate", str(path), "--no-progress", "--no-plots", "--out", str(tmp_path / "o")], message)


def _lengths_file_config(tmp_path, lengths: Path) -> Path:
    return _write(tmp_path, lambda r: r["workload"].update({"lognormal": None, "lengths_file": str(lengths)}))


def test_unusable_lengths_files(tmp_path) -> None:
    for name, text, message in [
        ("nan.txt", "100\nnan\n", "nan.txt:2: lengths must be finite"),
        ("inf.txt", "inf\n", "inf.txt:1"),
        ("null.json", "[1, null]", "lengths must be numbers"),
        ("obj.json", "[1, {}]", "lengths must be numbers"),
        ("deep.json", "[" * 100_000, "not a JSON list"),
        ("jnan.json", "[1, NaN]", "lengths must be finite"),
    ]:
        (tmp_path / name).write_text(text)
        path = _lengths_file_config(tmp_path, tmp_path / name)
        _cli_fails(["plan", "--config", str(path)], "workload.lengths_file", message)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe1\n")
    path = _lengths_file_config(tmp_path, tmp_path / "bin.txt")
    _cli_fails(["plan", "--config", str(path)], "not UTF-8")
    _cli_fails(["plan", "--config", str(_lengths_file_config(tmp_path, tmp_path))], "is a directory")


def test_config_path_that_is_a_folder_or_not_utf8(tmp_path) -> None:
    _cli_fails(["plan", "--config", str(tmp_path)], str(tmp_path), "is a directory")
    _cli_fails(["simulate", str(tmp_path), "--out", str(tmp_path / "o")], "is a directory")
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xffworkload: 1\n")
    _cli_fails(["plan", "--config", str(bad)], "bad.yaml", "not UTF-8")


def test_command_line_values_that_are_not_yaml(tmp_path) -> None:
    _cli_fails(["plan", "--config", str(CASE), "--sweep", "workload.lognormal.mu=[1"], "--sweep", "not a valid YAML")
    _cli_fails(
        ["simulate", str(CASE), "--set", "simulation.seed=[", "--out", str(tmp_path)], "--set", "not a valid YAML"
    )


def test_output_paths_are_checked_first(tmp_path) -> None:
    _cli_fails(["plan", "--config", str(CASE), "--emit-values", str(tmp_path / "no" / "v.yaml")], "does not exist")
    afile = tmp_path / "f"
    afile.write_text("")
    _cli_fails(["plan", "--config", str(CASE), "--plot", str(afile)], "--plot", "not a directory")
    # simulate: refused before a (here hour-long) simulation runs, so no results are lost
    _cli_fails(["simulate", str(CASE), "--no-progress", "--out", str(afile)], "--out", "not a directory")


def test_json_output_has_no_nan(tmp_path) -> None:
    # a link so slow that nothing is offloaded: l_long is undefined, and JSON has no NaN
    res = CliRunner().invoke(main, ["plan", "--config", str(CASE), "--json", "--sweep", "link.gbps=0.000001"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.output, parse_constant=lambda c: pytest.fail(f"{c} in --json output"))["results"][0]
    assert row["offload_fraction"] == 0.0 and row["l_long"] is None


def test_lengths_file_of_zeros_is_refused(tmp_path) -> None:
    zeros = tmp_path / "zeros.txt"
    zeros.write_text("0\n0\n")
    _cli_fails(["plan", "--config", str(_lengths_file_config(tmp_path, zeros)), "--json"], "every length is 0")
