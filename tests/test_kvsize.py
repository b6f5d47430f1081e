"""KV-size model: every layer kind's arithmetic by hand, the real configs against models.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from prfaas_plugin.cli import main
from prfaas_plugin.kvsize import ConfigError, LayerKind, ModelKV

#: Real models' configs (their config.json, as published), kept in the repository.
CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
MIB = 2**20


def _model(name: str, **kw) -> ModelKV:
    return ModelKV.from_file(CONFIGS / name, **kw)


# -- each layer kind, hand-computed ------------------------------------------------------------
def test_gqa_with_different_k_and_v_head_dims() -> None:
    cfg = {
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 192,
        "v_head_dim": 128,
        "torch_dtype": "bfloat16",
    }
    m = ModelKV.from_config(cfg)
    assert m.token_bytes == 3 * 2 * (192 + 128) * 2
    assert m.kv_bytes(10) == 10 * 3 * 2 * 320 * 2
    assert m.fixed_bytes == 0


def test_mha_head_dim_from_hidden_size_and_fp8() -> None:
    cfg = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 256}
    assert ModelKV.from_config(cfg).token_bytes == 2 * 2 * 4 * 64 * 2
    assert ModelKV.from_config(cfg, kv_dtype="fp8").token_bytes == 2 * 2 * 4 * 64 * 1


def test_mla_caches_latent_plus_rope() -> None:
    cfg = {"num_hidden_layers": 4, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "num_attention_heads": 16}
    m = ModelKV.from_config(cfg)
    assert {layer.kind for layer in m.layers} == {LayerKind.MLA}
    assert m.token_bytes == 4 * 576 * 2


def test_sliding_window_counts_only_the_window() -> None:
    cfg = {
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "sliding_window": 100,
        "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
    }
    m = ModelKV.from_config(cfg)
    per = 1 * 32 * 2
    assert m.kv_bytes(50) == 4 * 50 * per  # shorter than the window: every layer holds all tokens
    assert m.kv_bytes(1000) == 3 * 100 * per + 1000 * per
    assert m.window_bytes == 3 * 100 * per


def test_gated_deltanet_state_and_conv() -> None:
    cfg = {
        "num_hidden_layers": 4,
        "full_attention_interval": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 32,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "torch_dtype": "bfloat16",
    }
    m = ModelKV.from_config(cfg)
    state = 4 * 16 * 32 * 2
    conv = (2 * 2 * 32 + 4 * 16) * 3 * 2
    assert m.state_bytes == 3 * (state + conv)
    assert m.token_bytes == 1 * 2 * 2 * 64 * 2
    assert ModelKV.from_config(cfg, state_dtype="fp32").state_bytes == 3 * (2 * state + conv)


def test_kda_mamba2_and_lightning_states() -> None:
    kda = {
        "num_hidden_layers": 4,
        "kv_lora_rank": 8,
        "qk_rope_head_dim": 8,
        "linear_attn_config": {
            "kda_layers": [1, 2, 3],
            "full_attn_layers": [4],
            "num_heads": 2,
            "head_dim": 4,
            "short_conv_kernel_size": 4,
        },
    }
    m = ModelKV.from_config(kda)
    assert m.state_bytes == 3 * (2 * 4 * 4 * 2 + 3 * 2 * 4 * 3 * 2)
    assert m.token_bytes == 16 * 2
    mamba = {
        "hybrid_override_pattern": "M-*M",
        "mamba_num_heads": 4,
        "mamba_head_dim": 8,
        "ssm_state_size": 16,
        "n_groups": 2,
        "conv_kernel": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 8,
    }
    m = ModelKV.from_config(mamba)
    assert m.state_bytes == 2 * (4 * 8 * 16 * 2 + (4 * 8 + 2 * 2 * 16) * 3 * 2)
    assert m.token_bytes == 2 * 8 * 2
    ring = {
        "num_hidden_layers": 8,
        "layer_group_size": 4,
        "kv_lora_rank": 4,
        "qk_rope_head_dim": 4,
        "num_attention_heads": 2,
        "head_dim": 8,
    }
    m = ModelKV.from_config(ring)
    assert [layer.kind for layer in m.layers].count(LayerKind.MLA) == 2
    assert m.state_bytes == 6 * 2 * 8 * 8 * 2


# -- the real configs against research/models.md ------------------------------------------------
@pytest.mark.parametrize(
    "name, per_token, fixed_mib",
    [
        ("minimax-m2.5.json", 253_952, 0.0),
        ("mimo-v2-flash.json", 23_040, 24.38),
        ("kimi-linear-48b-a3b.json", 8_064, 21.41),
        ("ring-2.5-1t.json", 11_520, 140.0),
        ("deepseek-v3.json", 70_272, 0.0),
        ("qwen3-235b-a22b.json", 192_512, 0.0),
    ],
)
def test_models_md_figures(name: str, per_token: int, fixed_mib: float) -> None:
    m = _model(name)
    assert m.token_bytes == per_token
    assert m.fixed_bytes / MIB == pytest.approx(fixed_mib, abs=0.01)


def test_qwen35_state_dtype_follows_config_and_can_be_overridden() -> None:
    assert _model("qwen3.5-397b-a17b.json").token_bytes == 30_720
    assert _model("qwen3.5-397b-a17b.json").state_bytes / MIB == pytest.approx(183.16, abs=0.01)  # fp32 per config
    bf16 = _model("qwen3.5-397b-a17b.json", state_dtype="bf16")
    assert bf16.state_bytes / MIB == pytest.approx(93.16, abs=0.01)
    assert bf16.kv_bytes(32768) / MIB == pytest.approx(1053.16, abs=0.01)  # models.md S_kv @32K


def test_mimo_phi_kv_matches_paper_table3() -> None:
    # models.md: MiMo at 32K prefills ~24.5K tok/s on 8xH200; paper Table 3 says 4.66 Gbps.
    assert _model("mimo-v2-flash.json").phi_kv_gbps(32768, 24_500) == pytest.approx(4.66, rel=0.01)


@pytest.mark.parametrize(
    "name, per_token",
    [
        ("qwen3-next-80b-a3b.json", 12 * 2 * 2 * 256 * 2),
        ("gemma3-27b.json", 10 * 2 * 16 * 128 * 2),
        ("llama-3.1-8b.json", 32 * 2 * 8 * 128 * 2),
        ("qwen3-8b.json", 36 * 2 * 8 * 128 * 2),
    ],
)
def test_extra_configs(name: str, per_token: int) -> None:
    assert ModelKV.from_file(CONFIGS / name).token_bytes == per_token


# -- errors ---------------------------------------------------------------------------------------
def test_unknown_architecture_names_the_fields_it_lacks(tmp_path) -> None:
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"architectures": ["Mystery"], "hidden_size": 8}))
    with pytest.raises(ConfigError, match="Mystery.*num_key_value_heads"):
        ModelKV.from_file(p)


def test_family_missing_a_field_is_named() -> None:
    with pytest.raises(ConfigError, match="linear_key_head_dim"):
        ModelKV.from_config(
            {
                "num_hidden_layers": 4,
                "linear_num_value_heads": 2,
                "linear_num_key_heads": 2,
                "linear_value_head_dim": 8,
                "full_attention_interval": 4,
                "num_attention_heads": 2,
            }
        )
    with pytest.raises(ConfigError, match="num_hidden_layers must be > 0"):
        ModelKV.from_config({"num_hidden_layers": 0, "num_attention_heads": 2, "hidden_size": 8})


def test_bad_json_and_missing_file(tmp_path) -> None:
    p = tmp_path / "bad.json"
    p.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelKV.from_file(p)
    with pytest.raises(ConfigError, match="no such file"):
        ModelKV.from_file(tmp_path / "absent.json")


# -- the command ------------------------------------------------------------------------------------
def test_cli_json_and_phi(tmp_path) -> None:
    res = CliRunner().invoke(
        main,
        [
            "kv-size",
            str(CONFIGS / "llama-3.1-8b.json"),
            "--lengths",
            "1K,32K",
            "--prefill-tokens-per-s",
            "10000",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["bytes_per_token"] == 131072
    assert [r["tokens"] for r in d["lengths"]] == [1024, 32768]
    assert d["lengths"][1]["phi_kv_gbps"] == pytest.approx(131072 * 8 * 10000 / 1e9, rel=1e-3)


def test_cli_rejects_bad_lengths() -> None:
    res = CliRunner().invoke(main, ["kv-size", str(CONFIGS / "llama-3.1-8b.json"), "--lengths", "8K,abc"])
    assert res.exit_code != 0 and "not a length" in res.output


def _kv_size_fails(args: list[str], *needles: str) -> None:
    res = CliRunner().invoke(main, ["kv-size", *args])
    assert res.exit_code != 0, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    for needle in needles:
        assert needle in res.output, res.output


@pytest.mark.parametrize("rate", ["nan", "inf", "-inf", "0"])
def test_cli_rejects_a_non_finite_or_non_positive_prefill_rate(rate: str) -> None:
    _kv_size_fails(
        [str(CONFIGS / "llama-3.1-8b.json"), f"--prefill-tokens-per-s={rate}"], "--prefill-tokens-per-s", "finite"
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_attention_heads", 0, "num_attention_heads must be > 0"),
        ("num_key_value_heads", 0, "num_key_value_heads must be > 0"),
        ("hidden_size", -4096, "hidden_size must be > 0"),
        ("hidden_size", True, "hidden_size must be a whole number"),
        ("hidden_size", "abc", "hidden_size must be a whole number"),
        ("hidden_size", [1], "hidden_size must be a whole number"),
        ("num_hidden_layers", {}, "num_hidden_layers must be a whole number"),
        ("num_hidden_layers", 32.5, "num_hidden_layers must be a whole number"),
        ("head_dim", 0, "head_dim must be > 0"),
        ("v_head_dim", -64, "v_head_dim must be > 0"),
    ],
)
def test_bad_model_config_values_are_named(tmp_path, field, value, message) -> None:
    cfg = json.loads((CONFIGS / "llama-3.1-8b.json").read_text())
    cfg.pop("head_dim", None)
    cfg[field] = value
    path = tmp_path / "m.json"
    path.write_text(json.dumps(cfg))
    _kv_size_fails([str(path)], "m.json", message)


def test_unreadable_model_configs_are_named(tmp_path) -> None:
    (tmp_path / "bin.json").write_bytes(b"\xff{}")
    (tmp_path / "nan.json").write_text('{"num_attention_heads": NaN}')
    (tmp_path / "deep.json").write_text("[" * 100_000)
    (tmp_path / "big.json").write_text('{"hidden_size": 1' + "0" * 5000 + "}")
    (tmp_path / "lac.json").write_text('{"linear_attn_config": "x", "num_hidden_layers": 4}')
    _kv_size_fails([str(tmp_path)], "is a directory")
    _kv_size_fails([str(tmp_path / "bin.json")], "bin.json", "not UTF-8")
    _kv_size_fails([str(tmp_path / "nan.json")], "nan.json", "NaN")
    _kv_size_fails([str(tmp_path / "deep.json")], "deep.json", "nested too deeply")
    _kv_size_fails([str(tmp_path / "big.json")], "big.json", "not valid JSON")
    _kv_size_fails([str(tmp_path / "lac.json")], "lac.json", "Kimi-Linear layout")
