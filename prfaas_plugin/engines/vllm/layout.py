"""What crosses the wire for one request, derived from vLLM's KV cache config.

Both sides compute the same plan from (group spec, token count), so the consumer can check
every item it is offered. Scheme per group kind:
- full attention / MLA: the blocks covering tokens [0, n) (n = prompt length - 1, see N-1 backoff);
- sliding window: only the blocks the query at position n reads (kernels/window.py);
- Mamba / GDN (recurrent): the single state slot (the request's last block), once final.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from prfaas_plugin.kernels import window_block_range
from prfaas_plugin.transfer import LayoutFingerprint
from prfaas_plugin.transfer.binding import ItemNameCodec


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class GroupInfo:
    index: int
    kind: str  # "full" | "swa" | "state"
    block_size: int
    window: int
    layer_names: tuple[str, ...]
    page_bytes: int  # bytes of one block of one layer


def groups_of(kv_cache_config: Any) -> list[GroupInfo]:
    """Classify vLLM's KV cache groups by how their state must be moved."""
    from vllm.v1.kv_cache_interface import MambaSpec, SlidingWindowSpec

    out = []
    for i, g in enumerate(kv_cache_config.kv_cache_groups):
        spec = g.kv_cache_spec
        page = int(spec.page_size_bytes)
        if isinstance(spec, MambaSpec):
            # the state itself, not the page padded to the attention page size: only it is sent
            kind, window = "state", 0
            page = sum(math.prod(s) * torch.empty(0, dtype=d).element_size() for s, d in zip(spec.shapes, spec.dtypes))
        elif isinstance(spec, SlidingWindowSpec) or type(spec).__name__ == "SlidingWindowMLASpec":
            kind, window = "swa", int(spec.sliding_window)
        else:
            kind, window = "full", 0
        out.append(GroupInfo(i, kind, int(spec.block_size), window, tuple(g.layer_names), page))
    return out


def block_range(g: GroupInfo, num_tokens: int, num_blocks_held: int) -> tuple[int, int]:
    """[first, end) indices into the request's block list of ``g`` that carry tokens [0, n)."""
    if g.kind == "state":
        return (num_blocks_held - 1, num_blocks_held) if num_blocks_held else (0, 0)
    end = min(cdiv(num_tokens, g.block_size), num_blocks_held)
    if g.kind == "swa":  # the one window rule (kernels/window.py), clipped to the blocks held
        r = window_block_range(num_tokens, g.window, g.block_size)
        return min(r.start, end), end
    return 0, end


#: ``g<group>.b<first block>.n<blocks>.p<part>.<layer name>``
ITEM_NAME = ItemNameCodec("", ("g", "b", "n", "p"), tail=True)


def item_name(g: int, first: int, count: int, layer: str, part: int) -> str:
    return ITEM_NAME.encode(g, first, count, part, tail=layer)


def parse_item_name(name: str) -> tuple[int, int, int, int, str]:
    """(group, first block, blocks, part, layer); ItemNameError (a ValueError) refuses the item."""
    (g, b, n, p), layer = ITEM_NAME.decode(name)
    return g, b, n, p, layer


def fingerprint(
    groups: Sequence[GroupInfo],
    parts: dict[str, list[tuple[str, tuple[int, ...]]]],
    tp_rank: int,
    tp_size: int,
    model: str,
    dtype: str,
) -> LayoutFingerprint:
    """Everything P and D must share; a mismatch is refused at the handshake, naming the field."""
    fields: dict[str, Any] = {"engine": "vllm", "model": model, "dtype": dtype, "tp_size": tp_size, "tp_rank": tp_rank}
    for g in groups:
        fields[f"group{g.index}"] = {
            "kind": g.kind,
            "block_size": g.block_size,
            "window": g.window,
            "layers": list(g.layer_names),
        }
    for layer, ps in sorted(parts.items()):
        fields[f"layer:{layer}"] = [f"{dt}{list(shape)}" for dt, shape in ps]
    return LayoutFingerprint(fields)
