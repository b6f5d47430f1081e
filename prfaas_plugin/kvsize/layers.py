"""What one layer keeps per request, in bytes: the unit the KV-size model adds up.

Two shapes of cost exist, and PrfaaS's whole argument rests on telling them apart:
- per-token (block-level) caches grow with the prompt: full attention (GQA/MHA) and MLA latents;
- request-level caches do not: a linear-attention/SSM recurrent state (plus its short-conv
  state), or a sliding-window layer once the prompt is longer than its window.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

DTYPE_BYTES = {
    "bf16": 2,
    "bfloat16": 2,
    "fp16": 2,
    "float16": 2,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
    "fp32": 4,
    "float32": 4,
}


def dtype_bytes(name: str) -> int:
    try:
        return DTYPE_BYTES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPE_BYTES)}") from None


class LayerKind(str, Enum):
    FULL = "full_attention"  # GQA / MHA: K and V per token
    MLA = "mla"  # latent + rope key per token
    SLIDING = "sliding_window"  # K and V of the last `window` tokens only
    LINEAR = "linear_state"  # recurrent state (+ conv state) per request


@dataclass(frozen=True)
class LayerCache:
    """One layer's cache cost. ``token_bytes`` is per cached token (FULL, MLA, SLIDING);
    ``state_bytes``/``conv_bytes`` are per request (LINEAR). ``window`` caps SLIDING."""

    index: int
    kind: LayerKind
    token_bytes: int = 0
    window: int | None = None
    state_bytes: int = 0
    conv_bytes: int = 0
    family: str = ""

    def bytes_for(self, tokens: int) -> int:
        """Bytes this layer must ship for a prompt of ``tokens`` uncached tokens."""
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        if self.kind in (LayerKind.FULL, LayerKind.MLA):
            return self.token_bytes * tokens
        if self.kind is LayerKind.SLIDING:
            assert self.window is not None
            return self.token_bytes * min(tokens, self.window)
        return self.state_bytes + self.conv_bytes


def gqa_token_bytes(kv_heads: int, k_dim: int, v_dim: int, kv_dtype: int) -> int:
    return kv_heads * (k_dim + v_dim) * kv_dtype


def mla_token_bytes(kv_lora_rank: int, rope_dim: int, kv_dtype: int) -> int:
    # vLLM and SGLang cache the compressed latent plus the decoupled rope key; K/V are rebuilt.
    return (kv_lora_rank + rope_dim) * kv_dtype


def gated_delta_net_state(
    num_v_heads: int, k_dim: int, v_dim: int, num_k_heads: int, conv_kernel: int, state_dtype: int, conv_dtype: int
) -> tuple[int, int]:
    """Gated DeltaNet (Qwen3-Next, Qwen3.5): state n_v x v_dim x k_dim; the short conv runs over
    q, k and v channels (2 * n_k * k_dim + n_v * v_dim) and keeps kernel-1 positions."""
    state = num_v_heads * v_dim * k_dim * state_dtype
    conv = (2 * num_k_heads * k_dim + num_v_heads * v_dim) * (conv_kernel - 1) * conv_dtype
    return state, conv


def kda_state(num_heads: int, head_dim: int, conv_kernel: int, state_dtype: int, conv_dtype: int) -> tuple[int, int]:
    """Kimi Delta Attention: state heads x d x d; separate short convs on q, k and v."""
    state = num_heads * head_dim * head_dim * state_dtype
    conv = 3 * num_heads * head_dim * (conv_kernel - 1) * conv_dtype
    return state, conv


def lightning_state(num_heads: int, head_dim: int, state_dtype: int) -> tuple[int, int]:
    """Lightning attention (Ring/Ling linear layers, MiniMax-01): heads x d x d, no conv."""
    return num_heads * head_dim * head_dim * state_dtype, 0


def mamba2_state(
    num_heads: int, head_dim: int, state_size: int, n_groups: int, conv_kernel: int, state_dtype: int, conv_dtype: int
) -> tuple[int, int]:
    """Mamba2: SSM state heads x head_dim x d_state; conv over x, B and C channels."""
    state = num_heads * head_dim * state_size * state_dtype
    conv_channels = num_heads * head_dim + 2 * n_groups * state_size
    return state, conv_channels * (conv_kernel - 1) * conv_dtype
