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
    #: producer only: tokens whose KV is final once this step's forward is over (chunked prefill
    #: announces the transfer at its first chunk and streams what each chunk finished); None: all
    ready_tokens: int | None = None
    #: producer only: full-attention items cover this many tokens each (0: one item per layer), so
    #: a chunk's blocks can go while later chunks are computed; fixed by the first step's Transfer
    slice_tokens: int = 0

    @property
    def final(self) -> bool:
        """True once every token's KV and the recurrent/sliding-window state are final."""
        return self.ready_tokens is None or self.ready_tokens >= self.num_tokens


@dataclass
class PrfaaSMetadata(KVConnectorMetadata):
    sends: list[Transfer] = field(default_factory=list)
    loads: list[Transfer] = field(default_factory=list)
    #: consumer: request ids whose pending load to stop now (their offloaded prefill failed)
    aborts: list[str] = field(default_factory=list)
