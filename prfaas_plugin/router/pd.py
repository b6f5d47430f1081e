"""The engine-specific part of a disaggregated completion, as small strategy classes.

The router's flow (producer and consumer at once, stream the consumer's answer, fall back when
the producer fails) is the same for every engine; what differs is chosen once from
``RouterConfig.engine``:
- the two request bodies (protocol/requests.py builds them);
- whether an error answer from the decode side means the transfer failed (SGLang reports a
  failed transfer as the decode request's error; vLLM's consumer recomputes and answers 200);
- whether a decode instance can prefill on its own after a failed producer (a vLLM consumer
  can; an SGLang decode-mode server needs a prefill server of its cluster).

Client options (docs/router.md, "OpenAI options"): a vLLM producer computes one token that is
thrown away, so the options that only shape the *answer* are left out of its body
(:data:`ANSWER_ONLY`) -- ``n`` above all (it would sample n prefills' worth of work), and
``min_tokens``, which vLLM refuses above ``max_tokens: 1``. Anything that changes the prompt
(``messages``, ``tools``, chat template options) stays, or the pushed KV would not match.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from prfaas_plugin.protocol.requests import sglang_bodies, vllm_bodies
from prfaas_plugin.router.instances import Instance

#: Fields of a client's body that shape only the answer, never the prompt: a vLLM producer
#: (which answers one discarded token) does not get them.
ANSWER_ONLY = frozenset(
    {
        "n",
        "best_of",
        "logprobs",
        "top_logprobs",
        "prompt_logprobs",
        "echo",
        "min_tokens",
        "stream_options",
        "response_format",
        "structured_outputs",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "logit_bias",
    }
)


def needs_prompt_logprobs(body: dict[str, Any]) -> bool:
    """The answer carries the prompt's own logprobs (``prompt_logprobs``, or a completion's
    ``echo`` with ``logprobs``): the instance that answers must compute the prompt itself; KV
    pushed from elsewhere has no logprobs in it."""
    if body.get("prompt_logprobs") is not None:
        return True
    return bool(body.get("echo")) and body.get("logprobs") not in (None, False)


def fans_out(body: dict[str, Any]) -> bool:
    """The client asked for several samples (``n`` > 1)."""
    n = body.get("n")
    return isinstance(n, int) and n > 1


def warmup_body(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` reduced to a one-token, one-sample, non-streamed request: what the two-phase
    flow runs first for a request that fans out (flow.py, ``_prefill_then_fan_out``)."""
    out = {k: v for k, v in body.items() if k not in ANSWER_ONLY}
    out.update(max_tokens=1, stream=False)
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    return out


class PDProtocol(ABC):
    #: Name in ``RouterConfig.engine``.
    engine: str
    #: Decoding instances need ``kv_endpoint`` (their transfer receiver) in the router config.
    needs_kv_endpoint: bool = False
    #: Instances can switch between prefill and decode at run time (``threshold.apply_split``).
    switches_roles: bool = False

    def __init__(self, transfer_deadline_s: float) -> None:
        self.transfer_deadline_s = transfer_deadline_s

    @abstractmethod
    def bodies(self, body: dict[str, Any], prefill: Instance, decode: Instance) -> tuple[dict, dict, str]:
        """(producer body, consumer body, transfer id as recorded)."""

    @abstractmethod
    def decode_error_is_transfer_failure(self) -> bool:
        """A non-200 decode answer before any byte reached the client means the transfer failed."""

    @abstractmethod
    def decode_prefills_alone(self, decode: Instance) -> bool:
        """After a failed producer, ``decode`` can prefill the request itself."""


class VllmPD(PDProtocol):
    engine = "vllm"
    needs_kv_endpoint = True

    def bodies(self, body: dict[str, Any], prefill: Instance, decode: Instance) -> tuple[dict, dict, str]:
        if decode.kv_endpoint is None:
            raise ValueError(f"decode instance {decode.url} has no kv_endpoint for the prfaas connector")
        prod, cons, tid = vllm_bodies(body, decode.kv_endpoint, self.transfer_deadline_s)
        return {k: v for k, v in prod.items() if k not in ANSWER_ONLY}, cons, tid

    def decode_error_is_transfer_failure(self) -> bool:
        return False

    def decode_prefills_alone(self, decode: Instance) -> bool:
        return True


class SglangPD(PDProtocol):
    engine = "sglang"
    switches_roles = True

    def bodies(self, body: dict[str, Any], prefill: Instance, decode: Instance) -> tuple[dict, dict, str]:
        prod, cons, room = sglang_bodies(body, prefill.url, prefill.bootstrap_port)
        return prod, cons, f"bootstrap_room={room}"

    def decode_error_is_transfer_failure(self) -> bool:
        return True

    def decode_prefills_alone(self, decode: Instance) -> bool:
        return decode.can_prefill


PROTOCOLS: dict[str, type[PDProtocol]] = {p.engine: p for p in (VllmPD, SglangPD)}


def pd_protocol(engine: str, transfer_deadline_s: float) -> PDProtocol:
    try:
        cls = PROTOCOLS[engine]
    except KeyError:
        raise ValueError(f"unknown engine {engine!r}: expected one of {sorted(PROTOCOLS)}") from None
    return cls(transfer_deadline_s)
