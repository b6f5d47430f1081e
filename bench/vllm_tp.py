"""Bytes each decode rank receives when prefill and decode run different TP sizes (issue 19).

python bench/vllm_tp.py [--config examples/configs/kimi-linear-48b-a3b.json] [--tokens 32768]
                        [--pairs 8:4,4:8] [--no-append]

The routing is the connector's own (``engines/vllm/tp.py``: which rows of which layer part each
prefill rank sends to each decode rank); the per-layer sizes are ``prfaas kv-size``'s
(``prfaas_plugin.kvsize``). Kimi-Linear is KDA linear attention (conv state over q, k, v channels
and a recurrent state per head, both split by head across TP ranks, like vLLM) plus MLA layers (one
latent per token, replicated on every rank: each decode rank needs one whole copy, taken from one
of the prefill ranks that feed it). The table shows what crosses per decode rank and in total,
against the whole-instance KV size (one copy of everything).
"""

from __future__ import annotations

import argparse

from _common import ROOT, append_benchmarks

from prfaas_plugin.engines.vllm import tp
from prfaas_plugin.engines.vllm.tp import PartSplit, Segment
from prfaas_plugin.kvsize import ModelKV
from prfaas_plugin.kvsize.layers import LayerKind


def parts_of(cfg: dict, kv: ModelKV, tokens: int) -> list[tuple[str, PartSplit, int]]:
    """(name, split, whole-model bytes) of every layer part that crosses for ``tokens`` tokens."""
    lac = cfg.get("linear_attn_config") or {}
    heads, hd = int(lac["num_heads"]), int(lac["head_dim"])
    out = []
    for layer in kv.layers:
        if layer.kind is LayerKind.MLA:
            out.append((f"L{layer.index}.latent", PartSplit(), layer.bytes_for(tokens)))
        elif layer.kind is LayerKind.LINEAR:
            qkv = (Segment(heads, hd), Segment(heads, hd), Segment(heads, hd))
            out.append((f"L{layer.index}.conv", PartSplit(1, qkv), layer.conv_bytes))
            out.append((f"L{layer.index}.state", PartSplit(1, (Segment(heads),)), layer.state_bytes))
        else:
            raise SystemExit(f"{kv.name}: layer {layer.index} is {layer.kind.value}; this bench models KDA + MLA")
    return out


def routed(parts: list[tuple[str, PartSplit, int]], a: int, b: int) -> list[tuple[int, list[int], int]]:
    """Per decode rank: (rank, prefill ranks it hears from, bytes received)."""
    rows = []
    for d in range(b):
        total, sources = 0, set()
        for _, split, whole in parts:
            for p, slices in tp.route(split, a, b, d).items():
                sources.add(p)
                if split.replicated:
                    total += whole
                else:
                    all_rows = sum(s.heads * s.rows for s in split.segments)
                    assert whole % all_rows == 0, "a part's bytes must split into whole rows"
                    total += tp.piece_rows(slices) * (whole // all_rows)
        rows.append((d, sorted(sources), total))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "examples" / "configs" / "kimi-linear-48b-a3b.json"))
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--pairs", default="8:4,4:8,4:4", help="prefill_tp:decode_tp, comma-separated")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    import json

    cfg = json.loads(open(args.config).read())
    kv = ModelKV.from_file(args.config)
    whole = kv.kv_bytes(args.tokens)
    parts = parts_of(cfg, kv, args.tokens)
    assert sum(w for _, _, w in parts) == whole, "the parts must add up to prfaas kv-size's figure"
    mib = 2**20
    lines = [
        f"{kv.name}, {args.tokens:,} tokens: whole-instance KV (`prfaas kv-size`) {whole / mib:.2f} MiB ({whole:,} B)",
        "",
        "| prefill TP -> decode TP | decode rank | fed by prefill ranks | bytes received | MiB | share of whole |",
        "|---|---|---|---|---|---|",
    ]
    totals = []
    for pair in args.pairs.split(","):
        a, b = (int(x) for x in pair.split(":"))
        tp.check_tp_pair(a, b)
        rows = routed(parts, a, b)
        for d, src, n in rows:
            lines.append(f"| {a} -> {b} | {d} | {src} | {n:,} | {n / mib:.2f} | {n / whole * 100:.1f}% |")
        total = sum(n for _, _, n in rows)
        lines.append(f"| {a} -> {b} | all | | {total:,} | {total / mib:.2f} | {total / whole * 100:.1f}% |")
        totals.append((a, b, total))
    table = "\n".join(lines)
    print(table)
    if not args.no_append:
        append_benchmarks(
            "Heterogeneous TP: bytes per decode rank (issue 19)",
            table,
            notes="computed by the connector's routing (engines/vllm/tp.py) from prfaas kv-size's per-layer sizes; "
            "no transfer is run. The split state (KDA conv + recurrent) crosses once in total whatever the TP "
            "sizes; the replicated MLA latent crosses once per decode rank.",
        )


if __name__ == "__main__":
    main()
