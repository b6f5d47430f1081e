"""CPU figures for prfaas_plugin.kernels: pack/unpack GB/s against a memcpy of the same bytes.

Run: PYTHONPATH=. python bench/kernels.py [--tokens 4096] [--no-append]
Prints a table and appends it to BENCHMARKS.md. Ratios are measured side by side in one run;
memcpy is re-measured next to every case because a loaded host drifts within seconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import append_benchmarks

from prfaas_plugin.kernels import CacheGroup, pack, packed_nbytes, unpack

ROOT = Path(__file__).resolve().parent.parent


def _once(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _cases(tokens: int) -> dict[str, tuple[Callable[[int], list[torch.Tensor]], Callable, int]]:
    bs = 16
    n = tokens // bs
    pool = 2 * n
    return {
        "MLA 61L x 576 bf16, 16-tok blocks": (
            lambda nb: [torch.randn(nb, bs, 576).bfloat16() for _ in range(61)],
            CacheGroup.mla,
            pool,
        ),
        "GQA 32L K/V 8x128 bf16 (flash layout)": (
            lambda nb: [torch.randn(2, nb, bs, 8, 128).bfloat16() for _ in range(32)],
            CacheGroup.vllm_attention_gpu,
            pool,
        ),
        "GDN 48L state pages int8 (HMA raw)": (
            lambda nb: [torch.randint(-128, 127, (nb, 1, 1, 134144), dtype=torch.int8) for _ in range(48)],
            CacheGroup.state,
            max(8, tokens // 640 * 2),
        ),
    }


def fp8_error(group: CacheGroup, ids: list[int]) -> tuple[float, float]:
    """(max, mean) of |x - dequant(quant(x))| / amax of the x's head."""
    buf = pack(group, ids, fp8=True)
    dst = CacheGroup([torch.empty_like(t) for t in group.caches], group.layout)
    unpack(buf, dst, ids, fp8=True)
    lay = group.layout
    pre, heads, post = lay.head_split
    worst, means = 0.0, []
    for s, d in zip(group.caches, dst.caches):
        a = s.reshape(lay.num_outer, lay.num_blocks, pre, heads, post)[:, ids].float()
        b = d.reshape(lay.num_outer, lay.num_blocks, pre, heads, post)[:, ids].float()
        amax = a.abs().amax(dim=(2, 4), keepdim=True).clamp_min(1e-30)
        rel = (a - b).abs() / amax
        worst = max(worst, float(rel.max()))
        means.append(float(rel.mean()))
    return worst, statistics.mean(means)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=4096, help="request length (blocks moved = tokens/16)")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for name, (make, ctor, pool) in _cases(args.tokens).items():
        group = ctor(make(pool))
        n = args.tokens // 16 if "GDN" not in name else pool // 2
        ids = torch.randperm(pool)[:n].tolist()
        dst_ids = torch.randperm(pool)[:n].tolist()
        nbytes = packed_nbytes(group, n)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        a, b = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8).fill_(1)
        dst = CacheGroup([torch.empty_like(t) for t in group.caches], group.layout)
        # Interleave: each pack/unpack timing sits between two memcpy timings and the ratio is
        # taken per repetition, so the load drift of a shared host cancels as far as it can.
        copy = lambda: a.copy_(b)  # noqa: E731
        do_pack = lambda: pack(group, ids, out=buf)  # noqa: E731
        do_unpack = lambda: unpack(buf, dst, dst_ids)  # noqa: E731
        for f in (copy, do_pack, do_unpack):
            f()
        rp, ru, tps, tus, mems = [], [], [], [], []
        for _ in range(args.reps):
            c0 = _once(copy)
            tp_i = _once(do_pack)
            c1 = _once(copy)
            tu_i = _once(do_unpack)
            c2 = _once(copy)
            rp.append((c0 + c1) / 2 / tp_i)
            ru.append((c1 + c2) / 2 / tu_i)
            tps.append(tp_i)
            tus.append(tu_i)
            mems.extend([c0, c1, c2])
        tp, tu, mem = statistics.median(tps), statistics.median(tus), statistics.median(mems)
        gb = lambda s: nbytes / s / 1e9  # noqa: E731
        err = fp8_error(group, ids[: min(n, 64)]) if not group.layout.lossless else None
        rows.append((name, n, nbytes, gb(mem), gb(tp), statistics.median(rp), gb(tu), statistics.median(ru), err))
        del group, dst
    head = "| case | blocks | MiB | memcpy GB/s | pack GB/s | pack/memcpy (median of per-rep ratios) | unpack GB/s | unpack/memcpy (same) | fp8 err/amax max, mean |"
    lines = [head, "|" + "---|" * 9]
    for name, n, nb, mem, p, pr, u, ur, err in rows:
        e = f"{err[0]:.4f}, {err[1]:.5f}" if err else "lossless (not quantised)"
        lines.append(f"| {name} | {n} | {nb / 2**20:.0f} | {mem:.2f} | {p:.2f} | {pr:.2f} | {u:.2f} | {ur:.2f} | {e} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_append:
        append_benchmarks(
            "kernels: CPU pack/unpack vs memcpy",
            table,
            notes=f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; ratios are "
            "side by side in one run, absolute GB/s depend on what else the host runs",
        )


if __name__ == "__main__":
    main()
