"""Offline builders of tiny random-weight models that real vLLM (CPU build) can serve.

Why: the P/D tests and the demo need every layer kind the connector moves (full attention,
Gated DeltaNet state, sliding window, MLA latent) without network access. Dimensions respect the
CPU kernels' limits (GDN head dim 128, MLA latent 512+64=576). Weights are random, so text is
garbage, but greedy decoding is deterministic, which is what exact P/D comparisons need.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

_CORPUS = [
    "PrfaaS moves the KV cache of long prompts from a prefill cluster to decode instances.",
    "The quick brown fox jumps over the lazy dog while the router picks a prefill node.",
    "Hybrid models keep a recurrent state for linear layers and a cache for attention layers.",
    "Sliding window attention only needs the tail of the sequence inside its window.",
    "Multi-head latent attention stores one compressed latent per token and layer.",
]


def _tokenizer(out: Path) -> None:
    """A byte-level BPE (vocab 512) so any text encodes without unknown tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    fast.save_pretrained(out)


def _common() -> dict:
    return dict(
        vocab_size=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        **_common(),
    )
    return Qwen3ForCausalLM(cfg)


def _qwen3next(linear_heads: int = 1):
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    cfg = Qwen3NextConfig(  # type: ignore[call-arg]  # transformers types its **kwargs per version
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_num_key_heads=linear_heads,
        linear_num_value_heads=linear_heads,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        full_attention_interval=4,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        **_common(),
    )
    return Qwen3NextForCausalLM(cfg)


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        sliding_window=64,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        **_common(),
    )
    return Gemma3ForCausalLM(cfg)


def _dsv3_mla():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(  # type: ignore[call-arg]  # transformers types its **kwargs per version
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=32,
        v_head_dim=32,
        first_k_dense_replace=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        rope_scaling=None,
        **_common(),
    )
    return DeepseekV3ForCausalLM(cfg)


BUILDERS: dict[str, Callable[[], Any]] = {
    "tiny-qwen3": _qwen3,
    "tiny-qwen3next": _qwen3next,
    # 2 linear-attention heads (and 2 KV heads): servable at TP 2, which the 1-head model is not
    # (vLLM splits GDN heads across ranks); the heterogeneous-TP tests use it
    "tiny-qwen3next-tp2": lambda: _qwen3next(linear_heads=2),
    "tiny-gemma3": _gemma3,
    "tiny-dsv3-mla": _dsv3_mla,
}


def build(name: str, root: Path, seed: int = 0) -> Path:
    """Build model ``name`` under ``root/name`` (skipped when already complete); return its dir."""
    if name not in BUILDERS:
        raise ValueError(f"unknown tiny model {name!r}; choose from {sorted(BUILDERS)}")
    out = Path(root) / name
    if (out / ".complete").exists():
        return out
    import torch

    torch.manual_seed(seed)
    model = BUILDERS[name]().to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    _tokenizer(out)
    (out / ".complete").write_text("ok\n")
    return out


if __name__ == "__main__":  # pragma: no cover - convenience for the demo and manual runs
    import sys

    for n in sys.argv[2:] or sorted(BUILDERS):
        print(build(n, Path(sys.argv[1] if len(sys.argv) > 1 else "models")))
