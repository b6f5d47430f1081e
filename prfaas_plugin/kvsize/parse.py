"""Hugging Face ``config.json`` -> per-layer cache costs.

Each architecture family states its layout differently (a layer-type list, a 1-based index list,
a group size, a pattern string...). Detection goes from the most specific fields to the generic
GQA fallback; a config that matches nothing, or a family missing one of its fields, gets an
error that names the fields it lacks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from prfaas_plugin.kvsize.layers import (
    LayerCache,
    LayerKind,
    dtype_bytes,
    gated_delta_net_state,
    gqa_token_bytes,
    kda_state,
    lightning_state,
    mamba2_state,
    mla_token_bytes,
)


class ConfigError(ValueError):
    """The config cannot be turned into a cache layout; the message names what is missing."""


Config = Mapping[str, Any]


def text_config(cfg: Config) -> Config:
    """Multimodal wrappers (Qwen3.5, Gemma3) keep the language model under ``text_config``."""
    inner = cfg.get("text_config")
    if isinstance(inner, Mapping):
        merged = dict(cfg)
        merged.update(inner)
        return merged
    return cfg


def _count(cfg: Config, family: str, key: str) -> int:
    """A size or count field: a whole number >= 1 (a JSON 32.0 is accepted as 32)."""
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or (isinstance(v, float) and not v.is_integer()):
        raise ConfigError(f"{family}: {key} must be a whole number, got {v!r}")
    if v < 1:
        raise ConfigError(f"{family}: {key} must be > 0, got {v!r}")
    return int(v)


def _need(cfg: Config, family: str, *keys: str) -> list[int]:
    """The count fields ``keys`` (every caller asks for sizes or counts), each checked by _count."""
    missing = [k for k in keys if cfg.get(k) is None]
    if missing:
        raise ConfigError(f"{family} layout needs field(s) {', '.join(missing)} in config.json")
    return [_count(cfg, family, k) for k in keys]


def _head_dim(cfg: Config, family: str) -> int:
    if cfg.get("head_dim") is not None:
        return _count(cfg, family, "head_dim")
    hidden, heads = _need(cfg, family, "hidden_size", "num_attention_heads")
    return hidden // heads


def _kv_heads(cfg: Config, family: str) -> int:
    key = "num_key_value_heads" if cfg.get("num_key_value_heads") is not None else "num_attention_heads"
    return _need(cfg, family, key)[0]


def _n_layers(cfg: Config, family: str) -> int:
    return _need(cfg, family, "num_hidden_layers")[0]


# -- families ---------------------------------------------------------------------------------
def _kimi_linear(cfg: Config, kv: int, st: int, conv: int) -> list[LayerCache]:
    fam = "Kimi-Linear (KDA + MLA)"
    lac = cfg["linear_attn_config"]
    n = _n_layers(cfg, fam)
    kda = {int(i) - 1 for i in lac.get("kda_layers") or []}  # 1-based in the config
    full = {int(i) - 1 for i in lac.get("full_attn_layers") or []}
    if not kda and not full:
        raise ConfigError(f"{fam} layout needs linear_attn_config.kda_layers or full_attn_layers")
    rank, rope = _need(cfg, fam, "kv_lora_rank", "qk_rope_head_dim")
    heads = lac.get("num_heads") or cfg.get("num_attention_heads")
    hd = lac.get("head_dim")
    if heads is None or hd is None:
        raise ConfigError(f"{fam} layout needs linear_attn_config.num_heads and .head_dim")
    kernel = int(lac.get("short_conv_kernel_size", 4))
    state, conv_b = kda_state(int(heads), int(hd), kernel, st, conv)
    out = []
    for i in range(n):
        if i in kda or (i not in full and full):
            out.append(LayerCache(i, LayerKind.LINEAR, state_bytes=state, conv_bytes=conv_b, family="kda"))
        else:
            out.append(
                LayerCache(i, LayerKind.MLA, token_bytes=mla_token_bytes(int(rank), int(rope), kv), family="mla")
            )
    return out


def _mimo(cfg: Config, kv: int, st: int, conv: int) -> list[LayerCache]:
    fam = "MiMo-V2 (SWA + GQA)"
    pattern = [int(x) for x in cfg["hybrid_layer_pattern"]]
    g_heads, g_k = _need(cfg, fam, "num_key_value_heads", "head_dim")
    g_v = _count(cfg, fam, "v_head_dim") if cfg.get("v_head_dim") is not None else g_k
    s_heads, s_k = _need(cfg, fam, "swa_num_key_value_heads", "swa_head_dim")
    s_v = _count(cfg, fam, "swa_v_head_dim") if cfg.get("swa_v_head_dim") is not None else s_k
    window = cfg.get("sliding_window") or cfg.get("sliding_window_size")
    if window is None:
        raise ConfigError(f"{fam} layout needs field sliding_window")
    out = []
    for i, kind in enumerate(pattern):
        if kind == 1:
            out.append(
                LayerCache(
                    i,
                    LayerKind.SLIDING,
                    token_bytes=gqa_token_bytes(int(s_heads), int(s_k), int(s_v), kv),
                    window=int(window),
                    family="swa",
                )
            )
        else:
            out.append(
                LayerCache(
                    i, LayerKind.FULL, token_bytes=gqa_token_bytes(int(g_heads), int(g_k), int(g_v), kv), family="gqa"
                )
            )
    return out


def _qwen_next(cfg: Config, kv: int, st: int, conv: int) -> list[LayerCache]:
    fam = "Qwen3-Next/Qwen3.5 (Gated DeltaNet + attention)"
    n = _n_layers(cfg, fam)
    types = cfg.get("layer_types")
    if not types:
        (interval,) = _need(cfg, fam, "full_attention_interval")
        types = ["full_attention" if (i + 1) % int(interval) == 0 else "linear_attention" for i in range(n)]
    nk, nv, dk, dv = _need(
        cfg, fam, "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim"
    )
    kernel = int(cfg.get("linear_conv_kernel_dim", 4))
    state, conv_b = gated_delta_net_state(int(nv), int(dk), int(dv), int(nk), kernel, st, conv)
    tok = gqa_token_bytes(_kv_heads(cfg, fam), _head_dim(cfg, fam), _head_dim(cfg, fam), kv)
    out = []
    for i, t in enumerate(types):
        if t == "linear_attention":
            out.append(LayerCache(i, LayerKind.LINEAR, state_bytes=state, conv_bytes=conv_b, family="gated_deltanet"))
        else:
            out.append(LayerCache(i, LayerKind.FULL, token_bytes=tok, family="gqa"))
    return out


def _bailing_linear(cfg: Config, kv: int, st: int, conv: int) -> list[LayerCache]:
    fam = "Ring/Ling linear (Lightning + MLA)"
    n = _n_layers(cfg, fam)
    (group,) = _need(cfg, fam, "layer_group_size")
    rank, rope = _need(cfg, fam, "kv_lora_rank", "qk_rope_head_dim")
    heads = cfg.get("num_kv_heads_for_linear_attn") or cfg.get("num_attention_heads")
    if heads is None:
        raise ConfigError(f"{fam} layout needs field num_attention_heads")
    hd = _head_dim(cfg, fam)
    state, _ = lightning_state(int(heads), hd, st)
    out = []
    for i in range(n):
        if (i + 1) % int(group) == 0:  # the last layer of each group is softmax (MLA) attention
            out.append(
                LayerCache(i, LayerKind.MLA, token_bytes=mla_token_bytes(int(rank), int(rope), kv), family="mla")
            )
        else:
            out.append(LayerCache(i, LayerKind.LINEAR, state_bytes=state, family="lightning"))
    return out


def _minimax(cfg: Config, kv: int, st: int, conv: int) -> list[LayerCache]:
    fam = "MiniMax (attn_type_list: 0 = lightning, 1 = softmax GQA)"
    types = [int(x) for x in cfg["attn_type_list"]]
    hd = _head_dim(cfg, fam)
    tok = gqa_token_bytes(_kv_heads(cfg, fam), hd, hd, kv)
    heads = int(_need(cfg, fam, "num_attention_heads")[0])
    state, _ = lightning_state(heads, hd, st)
    return [
        LayerCache(i, LayerKind.FULL, token_bytes=tok, family="gqa")
        if t == 1
        else LayerCache(i, LayerKind.LINEAR, state_bytes=state, family="lightning")
        for i, t in enumerate(types)
    ]


def _nemotron_h(cfg: Config, kv: int, st: int, conv: int) -> list[LayerCache]:
    fam = "Nemotron-H (Mamba2 + attention)"
    pattern = str(cfg["hybrid_override_pattern"])
    heads, hd, d_state = _need(cfg, fam, "mamba_num_heads", "mamba_head_dim", "ssm_state_size")
    groups = int(cfg.get("n_groups", 1))
    kernel = int(cfg.get("conv_kernel", 4))
    state, conv_b = mamba2_state(int(heads), int(hd), int(d_state), groups, kernel, st, conv)
    ahd = _head_dim(cfg, fam)
    tok = gqa_token_bytes(_kv_heads(cfg, fam), ahd, ahd, kv)
    out = []
    for i, ch in enumerate(pattern):
        if ch == "M":
            out.append(LayerCache(i, LayerKind.LINEAR, state_bytes=state, conv_bytes=conv_b, family="mamba2"))
        elif ch == "*":
            out.append(LayerCache(i, LayerKind.FULL, token_bytes=tok, family="gqa"))
    return out


def _sliding_types(cfg: Config, fam: str) -> list[str] | None:
    types = cfg.get("layer_types")
    if types:
        return [str(t) for t in types]
    pattern = cfg.get("sliding_window_pattern")
    if pattern:
        n = _n_layers(cfg, fam)
        return ["full_attention" if (i + 1) % int(pattern) == 0 else "sliding_attention" for i in range(n)]
    return None


def _gemma_or_gqa(cfg: Config, kv: int, st: int, conv: int) -> list[LayerCache]:
    fam = "GQA/MHA attention"
    n = _n_layers(cfg, fam)
    hd = _head_dim(cfg, fam)
    k_dim = hd
    v_dim = _count(cfg, fam, "v_head_dim") if cfg.get("v_head_dim") is not None else hd
    tok = gqa_token_bytes(_kv_heads(cfg, fam), k_dim, v_dim, kv)
    window = cfg.get("sliding_window")
    uses_window = window is not None and cfg.get("use_sliding_window", True) is not False
    types = _sliding_types(cfg, fam) if uses_window else None
    if uses_window and types is None:
        types = ["sliding_attention"] * n  # Mistral-style: every layer windowed
    out = []
    for i in range(n):
        t = types[i] if types else "full_attention"
        if t == "sliding_attention":
            out.append(LayerCache(i, LayerKind.SLIDING, token_bytes=tok, window=int(window or 0), family="swa"))
        else:
            out.append(LayerCache(i, LayerKind.FULL, token_bytes=tok, family="gqa"))
    return out


def _deepseek_mla(cfg: Config, kv: int, st: int, conv: int) -> list[LayerCache]:
    fam = "DeepSeek-style MLA"
    n = _n_layers(cfg, fam)
    rank, rope = _need(cfg, fam, "kv_lora_rank", "qk_rope_head_dim")
    return [
        LayerCache(i, LayerKind.MLA, token_bytes=mla_token_bytes(int(rank), int(rope), kv), family="mla")
        for i in range(n)
    ]


_Family = Callable[[Config, int, int, int], list[LayerCache]]

# Most specific first: the key that identifies the family, and the parser.
FAMILIES: list[tuple[str, str, _Family]] = [
    ("linear_attn_config", "Kimi-Linear", _kimi_linear),
    ("hybrid_layer_pattern", "MiMo-V2", _mimo),
    ("linear_num_value_heads", "Qwen3-Next/Qwen3.5", _qwen_next),
    ("layer_group_size", "Ring/Ling linear", _bailing_linear),
    ("attn_type_list", "MiniMax", _minimax),
    ("hybrid_override_pattern", "Nemotron-H", _nemotron_h),
    ("kv_lora_rank", "DeepSeek MLA", _deepseek_mla),
    ("num_key_value_heads", "GQA", _gemma_or_gqa),
    ("num_attention_heads", "MHA", _gemma_or_gqa),
]


def parse_layers(
    cfg: Config, kv_dtype: str | None = None, state_dtype: str | None = None
) -> tuple[str, list[LayerCache]]:
    """(family name, layers). ``kv_dtype`` defaults to the model dtype (bf16 when unstated);
    ``state_dtype`` to ``mamba_ssm_dtype`` when the config sets one, else the model dtype."""
    if not isinstance(cfg, Mapping):
        raise ConfigError("config must be a JSON object")
    cfg = text_config(cfg)
    model_dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    kv = dtype_bytes(kv_dtype or model_dtype)
    st = dtype_bytes(state_dtype or str(cfg.get("mamba_ssm_dtype") or model_dtype))
    conv = dtype_bytes(model_dtype)
    for key, name, fn in FAMILIES:
        if cfg.get(key) is not None:
            try:
                layers = fn(cfg, kv, st, conv)
            except ConfigError:
                raise
            except (TypeError, ValueError, AttributeError, KeyError, IndexError, ZeroDivisionError) as exc:
                # The remaining optional fields (patterns, kernels, windows) of the wrong type.
                raise ConfigError(f"{name} layout: a field has the wrong type or value ({exc!r})") from None
            if not layers:
                raise ConfigError(f"{name} layout has no layers")
            for layer in layers:
                sizes = (layer.token_bytes, layer.state_bytes, layer.conv_bytes, layer.window or 0)
                if min(sizes) < 0 or layer.token_bytes + layer.state_bytes + layer.conv_bytes <= 0:
                    raise ConfigError(
                        f"{name} layout: layer {layer.index} has a size <= 0 (check its *_dim/heads fields)"
                    )
            return name, layers
    arch = cfg.get("architectures") or cfg.get("model_type") or "<unnamed>"
    raise ConfigError(
        f"cannot derive the KV layout of {arch}: the config has none of the fields that describe one "
        f"(num_key_value_heads or num_attention_heads with num_hidden_layers for attention; kv_lora_rank + "
        f"qk_rope_head_dim for MLA; layer_types/linear_* for Gated DeltaNet; linear_attn_config for KDA; "
        f"hybrid_layer_pattern for MiMo; layer_group_size for Ring; hybrid_override_pattern for Mamba2)"
    )
