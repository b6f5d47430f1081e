"""One-shot GPU check of prfaas_plugin.kernels: pack/unpack GB/s against a device-to-device
copy of the same bytes on the same card, plus bit-exactness against the torch path.

Run on a machine with one CUDA GPU (about 1-2 minutes, ~16 GiB of GPU memory):
    PYTHONPATH=. python bench/kernels_gpu.py [--tokens 32768] [--no-append]
Cases (issue 4): MLA 61 layers x 16-token blocks x 576 bf16, and GQA 32 layers x 8 KV heads x
128 (K and V, vLLM flash layout), 32K-token request gathered from a pool twice that size with
shuffled block ids. Target: pack and unpack >= 0.90 of the copy. Prints a table and appends
it to BENCHMARKS.md (card name included).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from _common import append_benchmarks

from prfaas_plugin.kernels import CacheGroup, pack, packed_nbytes, unpack

ROOT = Path(__file__).resolve().parent.parent


def _gpu_median_s(fn: Callable[[], object], reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def run_case(name: str, group: CacheGroup, n: int, reps: int) -> dict[str, object]:
    pool = group.layout.num_blocks
    ids = torch.randperm(pool)[:n].tolist()
    dst_ids = torch.randperm(pool)[:n].tolist()
    nbytes = packed_nbytes(group, n)
    buf = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    y = torch.empty(nbytes, dtype=torch.uint8, device="cuda")

    # correctness first: Triton equals the torch path bit for bit on this card
    ref = pack(group, ids, backend="torch")
    buf.fill_(0xA5)
    pack(group, ids, out=buf)
    raw_ok = torch.equal(buf, ref)
    del ref
    few = ids[:64]
    q_t = pack(group, few, fp8=True, backend="torch")
    q_k = pack(group, few, fp8=True)
    fp8_mismatch = int((q_t != q_k).sum())

    t_copy1 = _gpu_median_s(lambda: y.copy_(x), reps)
    t_pack = _gpu_median_s(lambda: pack(group, ids, out=buf), reps)
    t_unpack = _gpu_median_s(lambda: unpack(buf, group, dst_ids), reps)
    t_copy2 = _gpu_median_s(lambda: y.copy_(x), reps)
    t_copy = (t_copy1 + t_copy2) / 2
    fp8_buf = torch.empty(packed_nbytes(group, n, fp8=True), dtype=torch.uint8, device="cuda")
    t_qpack = _gpu_median_s(lambda: pack(group, ids, out=fp8_buf, fp8=True), reps)
    t_qunpack = _gpu_median_s(lambda: unpack(fp8_buf, group, dst_ids, fp8=True), reps)
    gb = lambda s: nbytes / s / 1e9  # noqa: E731  (source bytes per second)
    return {
        "case": name,
        "blocks": n,
        "GiB": nbytes / 2**30,
        "copy": gb(t_copy),
        "pack": gb(t_pack),
        "unpack": gb(t_unpack),
        "fp8_pack": gb(t_qpack),
        "fp8_unpack": gb(t_qunpack),
        "raw_ok": raw_ok,
        "fp8_mismatch": fp8_mismatch,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernels_gpu.py needs a CUDA GPU (this is the GPU half of bench/kernels.py)")
    torch.manual_seed(0)
    n = args.tokens // 16
    pool = 2 * n
    results = []
    caches = [torch.randn(pool, 16, 576, device="cuda", dtype=torch.bfloat16) for _ in range(61)]
    results.append(run_case("MLA 61L x 576 bf16", CacheGroup.mla(caches), n, args.reps))
    del caches
    torch.cuda.empty_cache()
    caches = [torch.randn(2, pool, 16, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(32)]
    results.append(run_case("GQA 32L K/V 8x128 bf16", CacheGroup.vllm_attention_gpu(caches), n, args.reps))
    del caches
    card = torch.cuda.get_device_name()
    lines = [
        "| case | blocks | GiB | d2d copy GB/s | pack GB/s (x copy) | unpack GB/s (x copy) | fp8 pack / unpack GB/s | "
        "pack == torch | fp8 bytes != torch |",
        "|" + "---|" * 9,
    ]
    for r in results:
        c = r["copy"]
        lines.append(
            f"| {r['case']} | {r['blocks']} | {r['GiB']:.2f} | {c:.0f} | {r['pack']:.0f} ({r['pack'] / c:.2f}) | "
            f"{r['unpack']:.0f} ({r['unpack'] / c:.2f}) | {r['fp8_pack']:.0f} / {r['fp8_unpack']:.0f} | "
            f"{r['raw_ok']} | {r['fp8_mismatch']} |"
        )
    table = "\n".join(lines)
    print(f"card: {card}\n{table}")
    if not args.no_append:
        append_benchmarks(
            "kernels: GPU pack/unpack vs device-to-device copy",
            table,
            notes=f"card {card}, torch {torch.__version__}; {args.tokens}-token request, 16-token "
            "blocks, pool twice the request, shuffled ids; GB/s count cache bytes moved",
        )


if __name__ == "__main__":
    main()
