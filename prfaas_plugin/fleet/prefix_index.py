"""Which instance holds which prompt prefix: a chain of block hashes per instance.

Block i's key hashes block i-1's key together with block i's token ids, so a key names a whole
prefix and the longest match is found by walking the prompt's blocks until one is missing. Two
feeds keep it current: the router's own record of what it routed (a prompt prefilled on an
instance leaves its full blocks cached there), and vLLM's KV-cache events when configured
(BlockStored / BlockRemoved / AllBlocksCleared), whose engine-side hashes are mapped onto ours
through the token ids the events carry. Memory is bounded: least recently used keys go first.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence


def block_keys(tokens: Sequence[int], block_size: int) -> list[bytes]:
    """Keys of every *full* block of ``tokens`` (a partial last block is never cached)."""
    keys = []
    parent = b""
    for start in range(0, len(tokens) - block_size + 1, block_size):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(b",".join(str(t).encode() for t in tokens[start : start + block_size]))
        parent = h.digest()
        keys.append(parent)
    return keys


class PrefixIndex:
    def __init__(self, block_size: int, capacity: int = 1_000_000, own_record: bool = True) -> None:
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.block_size = block_size
        #: False: :meth:`record` is ignored and the KV events alone feed the index, so router
        #: replicas that see different shares of the traffic hold the same index
        #: (``replicas.prefix_source: events``).
        self.own_record = own_record
        self.capacity = capacity
        self._holders: OrderedDict[bytes, set[str]] = OrderedDict()
        # instance -> engine block hash -> our key (to apply BlockRemoved events)
        self._engine_keys: dict[str, dict[object, bytes]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._holders)

    # -- feeds --------------------------------------------------------------------------------
    def record(self, instance: str, tokens: Sequence[int]) -> None:
        """``instance`` computed ``tokens``: their full blocks are now cached there."""
        if not self.own_record:
            return
        self._add(instance, block_keys(tokens, self.block_size))

    def _add(self, instance: str, keys: Iterable[bytes]) -> None:
        with self._lock:
            for k in keys:
                holders = self._holders.get(k)
                if holders is None:
                    holders = self._holders[k] = set()
                else:
                    self._holders.move_to_end(k)
                holders.add(instance)
            while len(self._holders) > self.capacity:
                self._holders.popitem(last=False)

    def block_stored(
        self,
        instance: str,
        engine_hashes: Sequence[object],
        parent_engine_hash: object,
        token_ids: Sequence[int],
        block_size: int,
    ) -> None:
        """Apply a vLLM BlockStored event (a run of consecutive blocks after ``parent``)."""
        if block_size != self.block_size:
            return  # another cache group (e.g. a sliding-window group): not prefix-reusable here
        with self._lock:
            emap = self._engine_keys.setdefault(instance, {})
            parent = emap.get(parent_engine_hash, b"") if parent_engine_hash is not None else b""
        if parent_engine_hash is not None and not parent:
            return  # we never saw the parent: cannot place this run in a prefix chain
        keys = []
        for i, eh in enumerate(engine_hashes):
            block = token_ids[i * block_size : (i + 1) * block_size]
            if len(block) < block_size:
                break
            h = hashlib.blake2b(parent, digest_size=16)
            h.update(b",".join(str(t).encode() for t in block))
            parent = h.digest()
            keys.append(parent)
            with self._lock:
                emap[eh] = parent
        self._add(instance, keys)

    def block_removed(self, instance: str, engine_hashes: Sequence[object]) -> None:
        with self._lock:
            emap = self._engine_keys.get(instance, {})
            for eh in engine_hashes:
                k = emap.pop(eh, None)
                if k is not None and k in self._holders:
                    self._holders[k].discard(instance)
                    if not self._holders[k]:
                        del self._holders[k]

    def clear_instance(self, instance: str) -> None:
        with self._lock:
            self._engine_keys.pop(instance, None)
            for k in [k for k, h in self._holders.items() if instance in h]:
                self._holders[k].discard(instance)
                if not self._holders[k]:
                    del self._holders[k]

    # -- queries ------------------------------------------------------------------------------
    def longest_prefix(self, tokens: Sequence[int], instances: Iterable[str]) -> tuple[int, str | None]:
        """(cached tokens, an instance holding them) over ``instances``; (0, None) if none."""
        allowed = set(instances)
        best_len, best_inst = 0, None
        with self._lock:
            candidates = allowed
            for i, k in enumerate(block_keys(tokens, self.block_size)):
                holders = self._holders.get(k)
                if not holders:
                    break
                candidates = candidates & holders
                if not candidates:
                    break
                best_len, best_inst = (i + 1) * self.block_size, min(candidates)
        return best_len, best_inst
