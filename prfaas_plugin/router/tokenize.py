"""Counting prompt tokens the way the engines will: the model's own fast tokenizer, with the
chat template applied to chat requests. Loaded once, offline, from a local folder."""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Mapping
from typing import Any, cast


class PromptError(ValueError):
    """A prompt the router cannot tokenize (wrong type, empty, over the size limit)."""


class PromptTokenizer:
    def __init__(self, path: str) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:
            raise ValueError(f"cannot load the tokenizer from {path!r}: {exc}") from None
        # A fast tokenizer's Rust object gives the same ids as ``tok.encode`` (the wrapper only
        # adds Python bookkeeping around the same call, several times the cost of the encode for
        # a short prompt); tests/test_router_tokenize.py checks the two agree.
        rust = getattr(self.tok, "_tokenizer", None) if getattr(self.tok, "is_fast", False) else None
        self._encode = rust.encode if rust is not None and hasattr(rust, "encode") else None

    def completion_tokens(self, prompt: Any) -> list[int]:
        """``prompt`` as /v1/completions accepts it: a string, or a list of token ids. Batched
        prompts (a list of strings) are refused: route them one by one."""
        if isinstance(prompt, str):
            if self._encode is not None:
                return self._encode(prompt, add_special_tokens=True).ids
            return list(self.tok.encode(prompt, add_special_tokens=True))
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if any(t < 0 for t in prompt):
                raise PromptError("token ids must be >= 0")
            return list(prompt)
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            return self.completion_tokens(prompt[0])
        raise PromptError("prompt must be a string or a list of token ids (batched prompts are not supported)")

    def chat_tokens(self, messages: Any, body: dict[str, Any]) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise PromptError("messages must be a non-empty list")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise PromptError("each message needs a string 'role'")
            if not isinstance(m.get("content"), (str, list)) and m.get("content") is not None:
                raise PromptError("message content must be a string or a list of parts")
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise PromptError("chat_template_kwargs must be an object")
        # Template variables only, as the engine treats them: a key naming one of the tokenizer
        # call's own options (return_tensors, truncation, max_length, tokenize, ...) would change
        # what is counted (a 100-token prompt counted as 1 got past max_prompt_tokens).
        kwargs = {k: v for k, v in kwargs.items() if k not in self._template_options}
        try:
            ids = self.tok.apply_chat_template(
                messages, add_generation_prompt=body.get("add_generation_prompt", True), tokenize=True, **kwargs
            )
        except Exception as exc:
            raise PromptError(f"cannot apply the chat template: {exc}") from None
        if isinstance(ids, Mapping):  # transformers 5 returns a BatchEncoding (a Mapping), not a list
            ids = ids["input_ids"]
        out = list(ids)
        if not all(isinstance(i, int) for i in out):
            raise PromptError("the chat template did not produce a list of token ids")
        return cast(list[int], out)

    @functools.cached_property
    def _template_options(self) -> frozenset[str]:
        """Parameters of the tokenizer's apply_chat_template itself (not template variables)."""
        params = inspect.signature(self.tok.apply_chat_template).parameters
        return frozenset(n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
