"""One worker rank's sessions when prefill and decode run different TP sizes.

``tp.py`` says which rows of a layer part go from which prefill rank to which decode rank; this
module turns that into what the worker half needs per *pair* (one prefill rank, one decode rank):
the session's transfer id and endpoint, its items, its handshake fingerprint, and the gather
(producer) or scatter (consumer) spec of every layer part it carries. Equal TP sizes never come
here: the worker keeps its rank-to-rank path, where every part is sent whole.

How each part is split across ranks is read from vLLM's KV cache specs (:func:`part_splits`):
attention KV by KV head, GDN conv channels as ``[q | k | v]`` and its recurrent state by value
head, MLA latents and TP-replicated states whole.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from prfaas_plugin.engines.vllm import tp
from prfaas_plugin.engines.vllm.layout import GroupInfo
from prfaas_plugin.engines.vllm.tp import PartSplit, Segment, TPLayoutError
from prfaas_plugin.transfer import LayoutFingerprint

#: one registered layer part: (tensor, block dim)
Parts = Mapping[str, Sequence[tuple[torch.Tensor, int]]]


def _head_dim(shape: tuple[int, ...], bdim: int, heads: int, block_size: int) -> int:
    """The dim of a paged attention tensor that holds its KV heads: not the block dim, not the
    K/V pair next to it, not the last (head size); the token-in-block dim only as a last resort."""
    kv = 0 if bdim == 1 else (1 if len(shape) == 5 and shape[1] == 2 else -1)
    cands = [i for i, s in enumerate(shape[:-1]) if s == heads and i not in (bdim, kv)]
    if len(cands) > 1:
        cands = [i for i in cands if shape[i] != block_size] or cands[:1]
    if len(cands) != 1:
        raise TPLayoutError(f"cannot find the KV-head dim ({heads} heads) of an attention cache {shape}")
    return cands[0]


def part_splits(kv_cache_config: Any, model_config: Any, parts: Parts, tp_size: int) -> dict[str, list[PartSplit]]:
    """How every registered layer part is split across this instance's TP ranks, checked against
    the local tensors (a rank holding other rows than the rule says is refused)."""
    from vllm.v1.kv_cache_interface import MambaSpec

    out: dict[str, list[PartSplit]] = {}
    for g in kv_cache_config.kv_cache_groups:
        spec = g.kv_cache_spec
        for lname in g.layer_names:
            ps = parts.get(lname, ())
            if not ps:
                continue
            if isinstance(spec, MambaSpec):
                splits = _state_splits(spec, model_config, ps, tp_size)
            elif "MLA" in type(spec).__name__:
                splits = [PartSplit() for _ in ps]
            else:
                total = int(model_config.get_total_num_kv_heads())
                splits = [
                    PartSplit(
                        _head_dim(tuple(x.shape), b, int(spec.num_kv_heads), int(spec.block_size)), (Segment(total),)
                    )
                    for x, b in ps
                ]
            for (x, _), s in zip(ps, splits):
                if not s.replicated and x.shape[s.dim] != tp.local_rows(s, 0, tp_size):
                    raise TPLayoutError(
                        f"{lname}: {x.shape[s.dim]} rows along dim {s.dim} of {tuple(x.shape)}, but {s.describe()} "
                        f"over TP {tp_size} gives {tp.local_rows(s, 0, tp_size)}"
                    )
            out[lname] = splits
    return out


def _state_splits(
    spec: Any, model_config: Any, ps: Sequence[tuple[torch.Tensor, int]], tp_size: int
) -> list[PartSplit]:
    """GDN state: the conv state's channels are ``[q | k | v]`` of this rank's heads, the
    recurrent state is per value head. vLLM registers either one tensor per state or (vLLM 0.32)
    one byte view of each block's page holding both states back to back; the latter is split
    along its byte axis, the conv state's ``[q | k | v]`` repeating once per kept position when
    it is stored position-major."""
    if getattr(spec, "tp_replicated", False):
        return [PartSplit() for _ in ps]
    kind = getattr(getattr(spec, "mamba_type", None), "name", str(getattr(spec, "mamba_type", "")))
    shapes = [f"{x.dtype}{tuple(x.shape)}" for x, _ in ps]
    if kind != "GDN_ATTN" or len(spec.shapes) != 2 or len(ps) not in (1, 2) or any(b != 0 for _, b in ps):
        raise TPLayoutError(f"no heterogeneous-TP rule for {kind or 'this'} recurrent state {shapes}")
    hf = model_config.hf_text_config
    nk, nv = int(hf.linear_num_key_heads), int(hf.linear_num_value_heads)
    dk, dv = int(hf.linear_key_head_dim), int(hf.linear_value_head_dim)
    qkv = (nk * dk, nk * dk, nv * dv)
    local = sum(qkv) // tp_size
    (c0, c1), rec_shape = spec.shapes
    if c1 == local and c0 != local:
        channel_axis, positions = 1, c0
    elif c0 == local and c1 != local:
        channel_axis, positions = 0, c1
    else:
        from vllm.model_executor.layers.mamba.mamba_utils import is_conv_state_dim_first

        channel_axis, positions = (0, c1) if is_conv_state_dim_first() else (1, c0)
    if len(ps) == 2:  # one typed tensor per state: split along their own axes
        return [PartSplit(1 + channel_axis, tuple(Segment(n) for n in qkv)), PartSplit(1, (Segment(nv),))]
    x = ps[0][0]
    esize = [torch.empty(0, dtype=d).element_size() for d in spec.dtypes]
    if x.element_size() != 1 or any(n != 1 for n in x.shape[1:-1]):
        raise TPLayoutError(f"GDN state page {shapes} is not a byte view of the page")
    if channel_axis == 1:  # [position][q|k|v] channels
        conv = tuple(Segment(n, esize[0]) for _ in range(positions) for n in qkv)
    else:  # [q|k|v] channels, each with its positions
        conv = tuple(Segment(n, positions * esize[0]) for n in qkv)
    rec = (Segment(nv, math.prod(rec_shape[1:]) * esize[1]),)
    return [PartSplit(x.dim() - 1, conv + rec)]


@dataclass(frozen=True)
class PartRoute:
    """One layer part's share in one pair's session."""

    split: PartSplit
    slices: tuple[tp.Slice, ...]
    whole: bool  # the prefill rank's packed blocks are sent as they are
    block_bytes: int  # bytes of one block of the piece that crosses
    piece_shape: tuple[int, ...]  # the piece without its block dim (fingerprinted)


@dataclass(frozen=True)
class Pair:
    """The session between prefill rank ``p`` and decode rank ``d``."""

    p: int
    d: int
    routes: dict[tuple[str, int], PartRoute]  # (layer, part) -> its share; absent: not carried
    fingerprint: LayoutFingerprint

    def session_id(self, transfer_id: str) -> str:
        return f"{transfer_id}.p{self.p}"


def _piece(x: torch.Tensor, bdim: int, split: PartSplit, slices: Sequence[tp.Slice]) -> tuple[int, tuple[int, ...]]:
    shape = list(x.shape)
    if not split.replicated:
        shape[split.dim] = tp.piece_rows(slices)
    per_block = [s for i, s in enumerate(shape) if i != bdim]
    return math.prod(per_block) * x.element_size(), tuple(per_block)


def pairs(
    groups: Sequence[GroupInfo],
    parts: Parts,
    splits: Mapping[str, Sequence[PartSplit]],
    prefill_tp: int,
    decode_tp: int,
    rank: int,
    producer: bool,
    base_fields: Mapping[str, Any],
) -> list[Pair]:
    """This rank's sessions: as a producer (``rank`` a prefill rank) one per decode rank it
    feeds, as a consumer one per prefill rank that feeds it; pairs that would carry nothing
    (a replicated part another feeder sends) are left out on both sides alike."""
    tp.check_tp_pair(prefill_tp, decode_tp)
    peers = tp.fed_by(rank, prefill_tp, decode_tp) if producer else tp.feeders(rank, prefill_tp, decode_tp)
    out = []
    for peer in peers:
        p, d = (rank, peer) if producer else (peer, rank)
        routes: dict[tuple[str, int], PartRoute] = {}
        for g in groups:
            for lname in g.layer_names:
                for i, (x, bdim) in enumerate(parts.get(lname, ())):
                    split = splits[lname][i]
                    slices = tp.route(split, prefill_tp, decode_tp, d).get(p)
                    if slices is None:
                        continue
                    nbytes, piece = _piece(x, bdim, split, slices)
                    routes[(lname, i)] = PartRoute(
                        split, slices, tp.sends_whole(slices, split, prefill_tp, p), nbytes, piece
                    )
        if not routes:
            continue
        fields = dict(base_fields)
        fields["tp"] = f"prefill TP {prefill_tp} -> decode TP {decode_tp}"
        fields["ranks"] = f"prefill rank {p} -> decode rank {d}"
        for (lname, i), r in sorted(routes.items()):
            fields[f"layer:{lname}:{i}"] = (
                f"{str(parts[lname][i][0].dtype)}{list(r.piece_shape)} {r.split.describe()} "
                + ",".join(f"{s.src}>{s.dst}x{s.rows}" for s in r.slices)
            )
        out.append(Pair(p, d, routes, LayoutFingerprint(fields)))
    return out
