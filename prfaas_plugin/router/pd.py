"""The engine-specific part of a disaggregated completion, as small strategy classes.

The router's flow (producer and consumer at once, stream the consumer's answer, fall back when
the producer fails) is the same for every engine; what differs is chosen once from
``RouterConfig.engine``:
- the two request bodies (protocol/requests.py builds them);
- whether an error answer from the decode side means the transfer failed (SGLang reports a
  failed transfer as the decode request's error; vLLM's consumer recomputes and answers 200);
- whether a decode instance can prefill on its own after a failed producer (a vLLM consumer
  can; an SGLang decode-mode server needs a prefill server of its cluster).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from prfaas_plugin.protocol.requests import sglang_bodies, vllm_bodies
from prfaas_plugin.router.instances import Instance


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
        return vllm_bodies(body, decode.kv_endpoint, self.transfer_deadline_s)

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
