"""The router counts prompt tokens through the fast tokenizer's Rust object (no transformers
wrapper per request); those ids must be exactly what ``tokenizer.encode`` gives, which is what
the engines see."""

from __future__ import annotations

from pathlib import Path

import pytest
from router_helpers import WORDS, build_tokenizer

from prfaas_plugin.router.tokenize import PromptTokenizer

PROMPTS = [
    "hello",
    " leading and trailing spaces ",
    "Sliding window attention only needs the tail of the sequence inside its window.",
    "<s> a special token written in the text </s> and again<s>",
    "unicode: naïve café 東京 🚀 — ok",
    "tabs\tand\nnewlines\r\n\n",
    "x" * 5000,
    " ".join(["PrfaaS moves the KV cache of long prompts"] * 300),
]


def _bpe_with_bos(path: Path) -> Path:
    """Byte-level BPE whose post-processor adds a BOS token, with added special tokens: the
    parts of a real tokenizer (Qwen, Llama) that the wrapper could conceivably treat apart."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        PROMPTS * 3,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(path))
    return path


def _demo_tokenizer(path: Path) -> Path:
    from prfaas_plugin.demo.tiny_models import _tokenizer

    _tokenizer(path)
    return path


@pytest.mark.parametrize("build", [_bpe_with_bos, _demo_tokenizer, build_tokenizer])
def test_fast_path_ids_equal_transformers_encode(tmp_path, build):
    from transformers import AutoTokenizer

    path = build(tmp_path / "tok")
    router_tok = PromptTokenizer(str(path))
    assert router_tok._encode is not None, "a fast tokenizer must take the Rust path"
    reference = AutoTokenizer.from_pretrained(str(path))
    prompts = PROMPTS if build is not build_tokenizer else [" ".join(WORDS[:50]), "w3 unknown w4"]
    for p in prompts:
        assert router_tok.completion_tokens(p) == list(reference.encode(p, add_special_tokens=True)), p
        assert router_tok.completion_tokens([p]) == list(reference.encode(p, add_special_tokens=True))
