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

Per hop (``ClusterSpec.transfer``, docs/router.md "The wire of each hop"): a vLLM prefill
instance hands its KV on either with the prfaas connector (:class:`VllmPD`, the engine's
protocol) or with vLLM's own ``NixlConnector`` (:class:`NixlPD`), typically inside a PD cluster
whose RDMA fabric NIXL uses; the decode instances then run both connectors under vLLM's
``MultiConnector`` (docs/vllm.md, "Next to NIXL"). :func:`hop_protocols` maps each choice to
its strategy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
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
    #: The consumer request needs the producer's answer (NIXL: where the prefilled blocks are),
    #: so the two requests go one after the other instead of at once.
    sequential: bool = False

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

    def handoff(self, answer: Mapping[str, Any]) -> dict[str, Any]:
        """Sequential protocols: the ``kv_transfer_params`` the consumer request carries, read
        from the producer's successful answer; ValueError (naming what is missing) when the
        answer cannot be handed on."""
        raise NotImplementedError(f"{type(self).__name__} sends both requests at once")

    def consumer_body(self, cons: dict[str, Any], handoff: dict[str, Any]) -> dict[str, Any]:
        """Sequential protocols: the consumer body ``bodies`` made, completed with ``handoff``."""
        raise NotImplementedError(f"{type(self).__name__} sends both requests at once")


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


class NixlPD(PDProtocol):
    """vLLM's ``NixlConnector`` request protocol (its pull mode, vLLM 0.32-0.34): the producer
    prefills with ``do_remote_decode`` and answers, in its top-level ``kv_transfer_params``, its
    engine id, side-channel host and port and the block ids that hold the prompt (kept for the
    decode to read until NIXL's ``VLLM_NIXL_ABORT_REQUEST_TIMEOUT``); the consumer request
    carries that answer (``do_remote_prefill``) and its NIXL connector reads the blocks. The
    router never looks inside: it only checks that the answer names the fields the decode side
    needs, so that a producer without NIXL fails over to local prefill instead of a decode that
    waits for nothing."""

    engine = "vllm"
    sequential = True
    #: What the consumer's ``NixlConnector`` needs from the producer's answer to read the blocks.
    HANDOFF_FIELDS = ("remote_engine_id", "remote_request_id", "remote_host", "remote_port", "remote_block_ids")

    def bodies(self, body: dict[str, Any], prefill: Instance, decode: Instance) -> tuple[dict, dict, str]:
        prod = {k: v for k, v in body.items() if k not in ANSWER_ONLY and k != "stream_options"}
        prod.update(
            max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True, "do_remote_prefill": False}
        )
        if "max_completion_tokens" in prod:
            prod["max_completion_tokens"] = 1
        return prod, dict(body), ""  # the transfer is named by the producer's answer (remote_request_id)

    def handoff(self, answer: Mapping[str, Any]) -> dict[str, Any]:
        params = answer.get("kv_transfer_params")
        if not isinstance(params, dict):
            raise ValueError("producer answered no kv_transfer_params (is it running NixlConnector?)")
        missing = [k for k in self.HANDOFF_FIELDS if params.get(k) is None]
        if missing:
            raise ValueError(f"producer's NIXL kv_transfer_params lack {', '.join(missing)}")
        if params.get("do_remote_prefill") is not True:
            raise ValueError("producer's NIXL kv_transfer_params do not ask for a remote prefill read")
        return dict(params)

    def consumer_body(self, cons: dict[str, Any], handoff: dict[str, Any]) -> dict[str, Any]:
        return {**cons, "kv_transfer_params": handoff}

    def decode_error_is_transfer_failure(self) -> bool:
        return False

    def decode_prefills_alone(self, decode: Instance) -> bool:
        return True


PROTOCOLS: dict[str, type[PDProtocol]] = {p.engine: p for p in (VllmPD, SglangPD)}
#: ``ClusterSpec.transfer`` values besides ``prfaas`` (the engine's own protocol), and the engines they serve.
HOP_TRANSFERS: dict[str, tuple[type[PDProtocol], tuple[str, ...]]] = {"nixl": (NixlPD, ("vllm",))}


def hop_protocols(engine_pd: PDProtocol) -> dict[str, PDProtocol]:
    """Each ``ClusterSpec.transfer`` choice open to ``engine_pd``'s engine, mapped to its strategy."""
    out: dict[str, PDProtocol] = {"prfaas": engine_pd}
    for name, (cls, engines) in HOP_TRANSFERS.items():
        if engine_pd.engine in engines:
            out[name] = cls(engine_pd.transfer_deadline_s)
    return out


def pd_protocol(engine: str, transfer_deadline_s: float) -> PDProtocol:
    try:
        cls = PROTOCOLS[engine]
    except KeyError:
        raise ValueError(f"unknown engine {engine!r}: expected one of {sorted(PROTOCOLS)}") from None
    return cls(transfer_deadline_s)
