"""What crosses between the two SGLang roles: item names, the layout fingerprint, and the two
control messages decode sends to prefill over SGLang's own ZMQ channel.

Kept free of SGLang imports so it is unit-tested without SGLang installed.

Item names are self-describing so the decode side needs no per-chunk agreement with prefill:

* ``kv.<b>.<start>.<count>``: pages ``start .. start+count`` of the request (positions in the
  destination page list decode sent) for KV buffer ``b`` (``KVArgs.kv_data_ptrs[b]``);
* ``st.<c>.<t>``: every slot/page of state component ``c``, tensor ``t`` (Mamba conv/temporal
  state, SWA window pages...), each with its own item length;
* ``aux.<j>``: the request's row of metadata buffer ``j`` (first token, logprobs, room...).

A request's KV pages are grouped so each item is a few MiB: big enough that per-item costs
vanish, small enough that a group is sent as soon as the prefill chunk that completes it ran.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from prfaas_plugin.transfer.api import ItemSpec, LayoutFingerprint
from prfaas_plugin.transfer.binding import ItemNameCodec, ItemNameError

#: Bumped on any change of item naming or message layout; part of the fingerprint.
WIRE_VERSION = 1

REG_TAG = b"PRFAAS_REG"
META_TAG = b"PRFAAS_META"
STATUS_TAG = b"PRFAAS_STATUS"

#: ``kv.<buffer>.<first page position>.<pages>``, ``st.<component>.<tensor>``, ``aux.<buffer>``
KV_NAME = ItemNameCodec("kv", ("", "", ""))
ST_NAME = ItemNameCodec("st", ("", ""))
AUX_NAME = ItemNameCodec("aux", ("",))


class WireError(ValueError):
    """A control message or item name that does not follow this module's format."""


@dataclass(frozen=True)
class Layout:
    """The transfer-relevant part of SGLang's ``KVArgs``, identical on both roles when they can
    exchange pages byte for byte."""

    page_size: int
    kv_cache_dtype: str
    kv_item_lens: tuple[int, ...]
    aux_item_lens: tuple[int, ...]
    state_types: tuple[str, ...]
    state_item_lens: tuple[tuple[int, ...], ...]
    attn_tp_size: int
    is_mla: bool

    def fingerprint(self) -> LayoutFingerprint:
        fields: dict[str, Any] = {
            "engine": "sglang",
            "wire": WIRE_VERSION,
            "page_size": self.page_size,
            "kv_cache_dtype": self.kv_cache_dtype,
            "kv_item_lens": list(self.kv_item_lens),
            "aux_item_lens": list(self.aux_item_lens),
            "state_types": list(self.state_types),
            "state_item_lens": [list(x) for x in self.state_item_lens],
        }
        # MLA pages are replicated across attention TP ranks, so the TP width does not change
        # their bytes; MHA pages hold a head slice and only match at equal width.
        if not self.is_mla:
            fields["attn_tp_size"] = self.attn_tp_size
        return LayoutFingerprint(fields)

    def to_json(self) -> dict[str, Any]:
        return {
            "page_size": self.page_size,
            "kv_cache_dtype": self.kv_cache_dtype,
            "kv_item_lens": list(self.kv_item_lens),
            "aux_item_lens": list(self.aux_item_lens),
            "state_types": list(self.state_types),
            "state_item_lens": [list(x) for x in self.state_item_lens],
            "attn_tp_size": self.attn_tp_size,
            "is_mla": self.is_mla,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Layout:
        try:
            return cls(
                page_size=int(d["page_size"]),
                kv_cache_dtype=str(d["kv_cache_dtype"]),
                kv_item_lens=tuple(int(x) for x in d["kv_item_lens"]),
                aux_item_lens=tuple(int(x) for x in d["aux_item_lens"]),
                state_types=tuple(str(x) for x in d["state_types"]),
                state_item_lens=tuple(tuple(int(y) for y in x) for x in d["state_item_lens"]),
                attn_tp_size=int(d["attn_tp_size"]),
                is_mla=bool(d["is_mla"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise WireError(f"malformed layout in registration: {exc!r}") from exc


def group_pages(num_pages: int, kv_item_lens: Sequence[int], target_bytes: int) -> int:
    """Pages per KV item: the largest count whose biggest item stays within ``target_bytes``
    (at least one page)."""
    if target_bytes <= 0:
        raise ValueError(f"target item size must be > 0, got {target_bytes}")
    biggest = max(kv_item_lens, default=0)
    if biggest <= 0:
        return max(1, num_pages)
    return max(1, target_bytes // biggest)


def kv_item_name(buf: int, start: int, count: int) -> str:
    return KV_NAME.encode(buf, start, count)


def plan_items(
    layout: Layout,
    num_pages: int,
    state_counts: Sequence[int | None],
    group: int,
) -> tuple[ItemSpec, ...]:
    """Every item of one request, in production order: page groups first (earlier pages
    first, all buffers of a group together, as chunked prefill produces them), then state and
    aux, which exist only after the last chunk."""
    if num_pages < 0 or group <= 0:
        raise ValueError(f"bad plan: num_pages={num_pages}, group={group}")
    if len(state_counts) != len(layout.state_item_lens):
        raise WireError(f"{len(state_counts)} state index lists for {len(layout.state_item_lens)} components")
    items: list[ItemSpec] = []
    order = 0
    for start in range(0, num_pages, group):
        count = min(group, num_pages - start)
        for b, item_len in enumerate(layout.kv_item_lens):
            items.append(ItemSpec(kv_item_name(b, start, count), count * item_len, order))
        order += 1
    for c, (n_states, lens) in enumerate(zip(state_counts, layout.state_item_lens)):
        if not n_states:
            continue
        for t, item_len in enumerate(lens):
            if item_len > 0:
                items.append(ItemSpec(ST_NAME.encode(c, t), n_states * item_len, order))
    for j, item_len in enumerate(layout.aux_item_lens):
        items.append(ItemSpec(AUX_NAME.encode(j), item_len, order + 1))
    return tuple(items)


@dataclass(frozen=True)
class ItemRef:
    """A parsed item name."""

    kind: str  # "kv", "st" or "aux"
    a: int  # kv: buffer, st: component, aux: buffer
    b: int = 0  # kv: first page position, st: tensor
    count: int = 0  # kv: pages


def parse_item_name(name: str) -> ItemRef:
    for kind, codec in (("kv", KV_NAME), ("st", ST_NAME), ("aux", AUX_NAME)):
        if name.startswith(kind + "."):
            try:
                values, _ = codec.decode(name)
            except ItemNameError:
                break
            return ItemRef(kind, *values)
    raise WireError(f"unknown item name {name!r}")


# ----------------------------------------------------------------------------------------------
# Control messages (decode -> prefill), carried as ZMQ multipart frames.
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Registration:
    """Sent once per (decode rank, prefill rank): who the decode rank is, where its transfer
    receiver listens and how its cache is laid out."""

    decode_key: str  # "ip:port" of the decode rank's ZMQ socket, unique per decode rank
    transfer_endpoint: str  # "host:port" that the prefill's transfer sender dials
    layout: Layout
    engine_rank: int

    def to_frames(self) -> list[bytes]:
        body = {
            "decode_key": self.decode_key,
            "transfer_endpoint": self.transfer_endpoint,
            "layout": self.layout.to_json(),
            "engine_rank": self.engine_rank,
        }
        return [REG_TAG, json.dumps(body).encode()]

    @classmethod
    def from_frames(cls, frames: Sequence[bytes]) -> Registration:
        body = _json_frame(frames, REG_TAG, 2)
        try:
            return cls(
                decode_key=str(body["decode_key"]),
                transfer_endpoint=str(body["transfer_endpoint"]),
                layout=Layout.from_json(body["layout"]),
                engine_rank=int(body["engine_rank"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise WireError(f"malformed registration: {exc!r}") from exc


@dataclass(frozen=True)
class Metadata:
    """Sent once per request to every prefill rank decode pairs with: where the request's
    pages, aux row and state slots go, and the session the prefill must open."""

    room: int
    decode_key: str
    required_dst_info_num: int
    is_dummy: bool
    session_id: str = ""
    token: str = ""
    aux_index: int | None = None
    decode_prefix_len: int | None = None
    kv_indices: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int32))
    state_indices: tuple[np.ndarray | None, ...] = ()

    def to_frames(self) -> list[bytes]:
        head = {
            "room": self.room,
            "decode_key": self.decode_key,
            "required_dst_info_num": self.required_dst_info_num,
            "is_dummy": self.is_dummy,
            "session_id": self.session_id,
            "token": self.token,
            "aux_index": self.aux_index,
            "decode_prefix_len": self.decode_prefix_len,
            "state_present": [s is not None for s in self.state_indices],
        }
        frames = [META_TAG, json.dumps(head).encode(), _i32(self.kv_indices)]
        frames += [_i32(s) if s is not None else b"" for s in self.state_indices]
        return frames

    @classmethod
    def from_frames(cls, frames: Sequence[bytes]) -> Metadata:
        head = _json_frame(frames, META_TAG, 3)
        try:
            present = [bool(x) for x in head["state_present"]]
            if len(frames) != 3 + len(present):
                raise WireError(f"metadata has {len(frames)} frames, expected {3 + len(present)}")
            states = tuple(np.frombuffer(frames[3 + i], dtype=np.int32) if p else None for i, p in enumerate(present))
            aux = head["aux_index"]
            prefix = head["decode_prefix_len"]
            return cls(
                room=int(head["room"]),
                decode_key=str(head["decode_key"]),
                required_dst_info_num=int(head["required_dst_info_num"]),
                is_dummy=bool(head["is_dummy"]),
                session_id=str(head["session_id"]),
                token=str(head["token"]),
                aux_index=None if aux is None else int(aux),
                decode_prefix_len=None if prefix is None else int(prefix),
                kv_indices=np.frombuffer(frames[2], dtype=np.int32),
                state_indices=states,
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, WireError):
                raise
            raise WireError(f"malformed metadata: {exc!r}") from exc


def _i32(a: Iterable[int] | np.ndarray) -> bytes:
    arr = np.asarray(a)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise WireError(f"indices must be integers, got {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int32).tobytes()


def _json_frame(frames: Sequence[bytes], tag: bytes, min_frames: int) -> dict[str, Any]:
    if len(frames) < min_frames or frames[0] != tag:
        raise WireError(f"not a {tag.decode()} message ({len(frames)} frames)")
    try:
        body = json.loads(frames[1])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"{tag.decode()}: body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise WireError(f"{tag.decode()}: body must be a JSON object")
    return body
