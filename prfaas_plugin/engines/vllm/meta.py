"""Scheduler -> worker instructions for one step (pickled across the engine's IPC boundary)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass
class Transfer:
    req_id: str
    transfer_id: str
    token: str
    deadline_s: float
    num_tokens: int  # tokens whose KV/state moves (prompt - 1)
    block_ids: tuple[list[int], ...]  # the request's blocks, one list per KV cache group
    endpoint: str = ""  # producer only: the consumer's receiver
    num_local_tokens: int = 0  # consumer only: prefix already cached locally


@dataclass
class PrfaaSMetadata(KVConnectorMetadata):
    sends: list[Transfer] = field(default_factory=list)
    loads: list[Transfer] = field(default_factory=list)
    #: consumer: request ids whose pending load to stop now (their offloaded prefill failed)
    aborts: list[str] = field(default_factory=list)
