"""Routing KV between a prefill instance of TP ``a`` and a decode instance of TP ``b``.

Pure arithmetic on per-rank tensor layouts (no vLLM, no transfer engine), so it can be proven
bit-exact on CPU tensors and shared by the producer (which slices) and the consumer (which
scatters): both sides compute the same :class:`Route` from the same facts and so agree on every
byte without negotiating.

The model: a layer part (one KV cache tensor of a layer, block dim included) is split across TP
ranks along one dim (:attr:`PartSplit.dim`). Along that dim the whole-model tensor is a
concatenation of *segments*, each a run of ``heads`` heads of ``rows`` rows; a rank holds, in
every segment, the heads vLLM gives it, concatenated in segment order. That covers
- attention KV (GQA/MHA, full or sliding window): one segment of the KV heads, 1 row per head;
- GDN linear attention: the conv state's channels are ``[q | k | v]`` per rank (three segments),
  the recurrent state one segment of value heads;
- replicated state (MLA's latent, a state vLLM keeps whole on every rank): no segment; any one
  rank's copy serves.
A segment with fewer heads than ranks is replicated the way vLLM replicates KV heads: rank ``r``
of ``t`` holds head ``r * heads // t`` (one head).

Only TP sizes where one divides the other are routed: then every decode rank is fed by a fixed
set of prefill ranks (``a/b`` of them, or one shared by ``b/a`` decode ranks), each session
carries whole head runs, and no byte crosses twice into the same decode rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class TPLayoutError(ValueError):
    """Two TP layouts that cannot be routed into each other (the message says why)."""


def check_tp_pair(prefill_tp: int, decode_tp: int) -> None:
    """Refuse TP sizes that cannot be paired, naming both."""
    if prefill_tp < 1 or decode_tp < 1:
        raise TPLayoutError(f"TP sizes must be >= 1 (prefill TP {prefill_tp}, decode TP {decode_tp})")
    if prefill_tp % decode_tp and decode_tp % prefill_tp:
        raise TPLayoutError(
            f"prefill TP {prefill_tp} and decode TP {decode_tp} cannot be paired: one TP size must divide "
            "the other so that each decode rank is fed whole head ranges by a fixed set of prefill ranks"
        )


def feeders(d_rank: int, prefill_tp: int, decode_tp: int) -> range:
    """The prefill ranks that feed decode rank ``d_rank`` (its sessions)."""
    check_tp_pair(prefill_tp, decode_tp)
    if not 0 <= d_rank < decode_tp:
        raise TPLayoutError(f"decode rank {d_rank} outside decode TP {decode_tp}")
    if prefill_tp >= decode_tp:
        k = prefill_tp // decode_tp
        return range(d_rank * k, (d_rank + 1) * k)
    p = d_rank * prefill_tp // decode_tp
    return range(p, p + 1)


def fed_by(p_rank: int, prefill_tp: int, decode_tp: int) -> range:
    """The decode ranks that prefill rank ``p_rank`` feeds (inverse of :func:`feeders`)."""
    check_tp_pair(prefill_tp, decode_tp)
    if not 0 <= p_rank < prefill_tp:
        raise TPLayoutError(f"prefill rank {p_rank} outside prefill TP {prefill_tp}")
    if prefill_tp >= decode_tp:
        d = p_rank * decode_tp // prefill_tp
        return range(d, d + 1)
    k = decode_tp // prefill_tp
    return range(p_rank * k, (p_rank + 1) * k)


@dataclass(frozen=True)
class Segment:
    """``heads`` whole-model heads of ``rows`` rows each along the split dim."""

    heads: int
    rows: int = 1


@dataclass(frozen=True)
class PartSplit:
    """How one layer part is split across TP ranks; no segments: replicated on every rank."""

    dim: int = 0
    segments: tuple[Segment, ...] = ()

    @property
    def replicated(self) -> bool:
        return not self.segments

    def describe(self) -> str:
        """A stable text for the handshake fingerprint."""
        if self.replicated:
            return "replicated"
        return f"dim{self.dim}:" + "+".join(f"{s.heads}x{s.rows}" for s in self.segments)


def held_heads(rank: int, tp: int, heads: int) -> range:
    """The whole-model heads of one segment that rank ``rank`` of TP ``tp`` holds."""
    if heads < 1:
        raise TPLayoutError(f"a segment needs >= 1 head, got {heads}")
    if heads >= tp:
        if heads % tp:
            raise TPLayoutError(f"{heads} heads do not split over TP {tp}")
        n = heads // tp
        return range(rank * n, (rank + 1) * n)
    if tp % heads:
        raise TPLayoutError(f"{heads} heads cannot be replicated evenly over TP {tp}")
    h = rank * heads // tp
    return range(h, h + 1)


def local_rows(split: PartSplit, rank: int, tp: int) -> int:
    """Rows along ``split.dim`` of rank ``rank``'s tensor (0 for a replicated part: not split)."""
    return sum(len(held_heads(rank, tp, s.heads)) * s.rows for s in split.segments)


def _local_offset(split: PartSplit, rank: int, tp: int, seg: int, head: int) -> int:
    """Row of ``head`` of segment ``seg`` inside rank ``rank``'s tensor."""
    off = sum(len(held_heads(rank, tp, s.heads)) * s.rows for s in split.segments[:seg])
    held = held_heads(rank, tp, split.segments[seg].heads)
    return off + (head - held.start) * split.segments[seg].rows


@dataclass(frozen=True)
class Slice:
    """Rows ``[src, src + rows)`` of the prefill rank's part go to rows ``[dst, dst + rows)`` of the
    decode rank's part; ``rows == 0`` means the whole (replicated) part."""

    src: int
    dst: int
    rows: int


def route(split: PartSplit, prefill_tp: int, decode_tp: int, d_rank: int) -> dict[int, tuple[Slice, ...]]:
    """For decode rank ``d_rank``: which prefill rank sends which rows of this part, and where
    they land. Every row of the decode rank's part is covered exactly once; adjacent runs from the
    same prefill rank are merged so a session carries as few slices as possible."""
    ranks = feeders(d_rank, prefill_tp, decode_tp)
    if split.replicated:
        return {ranks[0]: (Slice(0, 0, 0),)}
    runs: dict[int, list[Slice]] = {}
    dst = 0
    for si, seg in enumerate(split.segments):
        for h in held_heads(d_rank, decode_tp, seg.heads):
            p = next((q for q in ranks if h in held_heads(q, prefill_tp, seg.heads)), None)
            if p is None:  # cannot happen when one TP divides the other; kept as a loud guard
                raise TPLayoutError(f"no prefill rank among {list(ranks)} holds head {h} of segment {si}")
            src = _local_offset(split, p, prefill_tp, si, h)
            out = runs.setdefault(p, [])
            last = out[-1] if out else None
            if last is not None and last.src + last.rows == src and last.dst + last.rows == dst:
                out[-1] = Slice(last.src, last.dst, last.rows + seg.rows)
            else:
                out.append(Slice(src, dst, seg.rows))
            dst += seg.rows
    return {p: tuple(s) for p, s in sorted(runs.items())}


def sends_whole(slices: Sequence[Slice], split: PartSplit, prefill_tp: int, p_rank: int) -> bool:
    """True when the slices are the prefill rank's whole part in order, so the packed blocks are
    sent as they are (no gather copy); where they land on the decode rank does not matter here."""
    if len(slices) != 1:
        return False
    s = slices[0]
    return s.rows == 0 or (s.src == 0 and s.rows == local_rows(split, p_rank, prefill_tp))


def piece_rows(slices: Sequence[Slice]) -> int:
    return sum(s.rows for s in slices)


def gather_spec(slices: Sequence[Slice]) -> list[tuple[int, int]]:
    """Sender side: ``(start, rows)`` to gather from the prefill rank's packed blocks."""
    return [(s.src, s.rows) for s in slices]


def scatter_spec(slices: Sequence[Slice]) -> list[tuple[int, int, int]]:
    """Receiver side: ``(piece row, decode row, rows)`` to scatter the gathered piece."""
    out, at = [], 0
    for s in slices:
        out.append((at, s.dst, s.rows))
        at += s.rows
    return out
