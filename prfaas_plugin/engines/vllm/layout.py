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
    state_dtypes: tuple[str, ...] = ()  # a state group's per-state dtypes (vLLM sends the page as bytes)


def groups_of(kv_cache_config: Any) -> list[GroupInfo]:
    """Classify vLLM's KV cache groups by how their state must be moved."""
    from vllm.v1.kv_cache_interface import MambaSpec, SlidingWindowSpec

    out = []
    for i, g in enumerate(kv_cache_config.kv_cache_groups):
        spec = g.kv_cache_spec
        page = int(spec.page_size_bytes)
        dtypes: tuple[str, ...] = ()
        if isinstance(spec, MambaSpec):
            # the state itself, not the page padded to the attention page size: only it is sent
            kind, window = "state", 0
            page = sum(math.prod(s) * torch.empty(0, dtype=d).element_size() for s, d in zip(spec.shapes, spec.dtypes))
            dtypes = tuple(str(d) for d in spec.dtypes)
        elif isinstance(spec, SlidingWindowSpec) or type(spec).__name__ == "SlidingWindowMLASpec":
            kind, window = "swa", int(spec.sliding_window)
        else:
            kind, window = "full", 0
        out.append(GroupInfo(i, kind, int(spec.block_size), window, tuple(g.layer_names), page, dtypes))
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


#: The fingerprint field that states the conv state's order, named after the vLLM setting that
#: chooses it, so a refused handshake tells the operator what to set: vLLM keeps a GDN/Mamba conv
#: state as ``SD`` (positions, channels) by default and as ``DS`` (channels, positions) where
#: ``VLLM_SSM_CONV_STATE_LAYOUT=DS``, which NIXL needs and which vLLM's CPU platform picks by
#: itself on any instance whose ``--kv-transfer-config`` names NixlConnector (MultiConnector too).
CONV_LAYOUT_FIELD = "VLLM_SSM_CONV_STATE_LAYOUT"


def conv_state_layout() -> str:
    """This process's conv state order, "SD" or "DS" (vLLM reads it when it builds the cache)."""
    from vllm.model_executor.layers.mamba.mamba_utils import get_conv_state_layout

    return str(get_conv_state_layout())


def fingerprint(
    groups: Sequence[GroupInfo],
    parts: dict[str, list[tuple[str, tuple[int, ...]]]],
    tp_rank: int,
    tp_size: int,
    model: str,
    dtype: str,
    conv_layout: str | None = None,
) -> LayoutFingerprint:
    """Everything P and D must share; a mismatch is refused at the handshake, naming the field.

    vLLM hands recurrent-state layers over as one byte view per page, so the registered shapes
    cannot tell how the state inside is laid out: the state dtypes and the conv state's order
    (:data:`CONV_LAYOUT_FIELD`) are stated here, since a page copied between two instances that
    order it differently is read back scrambled, with no error."""
    fields: dict[str, Any] = {"engine": "vllm", "model": model, "dtype": dtype, "tp_size": tp_size, "tp_rank": tp_rank}
    for g in groups:
        fields[f"group{g.index}"] = {
            "kind": g.kind,
            "block_size": g.block_size,
            "window": g.window,
            "layers": list(g.layer_names),
        }
        if g.kind == "state":
            fields[f"group{g.index}"]["state_dtypes"] = list(g.state_dtypes)
    if conv_layout is None and any(g.kind == "state" for g in groups):
        conv_layout = conv_state_layout()
    if conv_layout is not None:
        fields[CONV_LAYOUT_FIELD] = conv_layout
    for layer, ps in sorted(parts.items()):
        fields[f"layer:{layer}"] = [f"{dt}{list(shape)}" for dt, shape in ps]
    return LayoutFingerprint(fields)
