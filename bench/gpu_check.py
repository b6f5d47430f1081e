"""One prepared run of the GPU KV data path (issue 18) on a lent GPU, engine-agnostic.

Imports only the core (kernels, kernels.device, kvsize, transfer): the GPU machine has torch,
triton, grpcio and protobuf, no vLLM or SGLang. Measures, for Qwen3-Next-like (Qwen3.5 config:
GQA full attention + GDN states) and Kimi-Linear-like (MLA + KDA states) KV of one 32K-token
request gathered from a pool twice that size with shuffled block ids:

1. pack and unpack (Triton on a GPU) against a plain device-to-device copy of the same bytes
   (goal >= 0.90);
2. gather + D2H into pinned staging (``DevicePath.stage_out``: side stream, bounded pool)
   against a raw pinned D2H of the same bytes (goal >= 0.90);
3. a bit-exact GPU -> TCP loopback (our transfer engine) -> GPU transfer, goodput against the
   raw multi-socket ceiling of bench/transfer.py on the same host (goal >= 0.85);
4. the slowdown of a forward-like matmul loop while transfers run (goal <= 5%).

    PYTHONPATH=. python bench/gpu_check.py            # on the GPU machine, < 8 min
    PYTHONPATH=. python bench/gpu_check.py --cpu      # same flow on CPU tensors, < 3 min
    PYTHONPATH=. python bench/gpu_check.py --cpu --tiny --no-append   # what CI runs

Prints a table and appends it to BENCHMARKS.md (figure, machine, date, command).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from _common import append_benchmarks, machine  # noqa: E402

from prfaas_plugin.kernels import CacheGroup, pack, packed_nbytes, unpack  # noqa: E402
from prfaas_plugin.kernels.device import DevicePath, Lease, Staged  # noqa: E402
from prfaas_plugin.kvsize import LayerKind, ModelKV  # noqa: E402
from prfaas_plugin.transfer import (  # noqa: E402
    GrpcTcpReceiver,
    GrpcTcpSender,
    ItemSpec,
    LayoutFingerprint,
    ReceiverConfig,
    SenderConfig,
    TransferManifest,
)

MODELS = {
    "Qwen3-Next-like": "qwen3.5-397b-a17b.json",
    "Kimi-Linear-like": "kimi-linear-48b-a3b.json",
}
MODEL_DIRS = (Path("/work/shared/models"), ROOT / "shared" / "models")
BLOCK = 16
FP = LayoutFingerprint({"bench": "gpu_check"})


class HostSeam:
    """The device seam on CPU tensors (``--cpu``): no streams, ordinary host memory, copies
    done at once. The flow through ``DevicePath`` is the GPU one."""

    def current_stream(self, device: torch.device) -> None:
        return None

    def side_stream(self, device: torch.device) -> None:
        return None

    def stream(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def record(self, stream: Any) -> None:
        return None

    def wait(self, stream: Any, event: Any) -> None:
        pass

    def query(self, event: Any) -> bool:
        return True

    def host_wait(self, event: Any) -> None:
        pass

    def pinned(self, nbytes: int) -> torch.Tensor:
        return torch.zeros(nbytes, dtype=torch.uint8)

    def host_view(self, pinned: torch.Tensor) -> np.ndarray:
        return pinned.numpy()

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: Any) -> None:
        dst.copy_(src)


# -- the caches -----------------------------------------------------------------------------------
@dataclass
class Group:
    name: str
    src: CacheGroup
    dst: CacheGroup
    ids: list[int]  # source blocks of the request
    dst_ids: list[int]  # where the consumer puts them

    @property
    def nbytes(self) -> int:
        return packed_nbytes(self.src, len(self.ids))


def _find_config(fname: str) -> Path:
    for d in MODEL_DIRS:
        if (d / fname).exists():
            return d / fname
    raise SystemExit(f"model config {fname} not found in {[str(d) for d in MODEL_DIRS]}")


def build(model: str, tokens: int, dev: torch.device, max_layers: int | None = None, seed: int = 0) -> list[Group]:
    """One request of ``tokens`` tokens of ``model``'s layers (at most ``max_layers`` of each
    kind): a paged full-attention (or MLA) group in vLLM's GPU layout, and the recurrent states
    as raw slots, source and destination."""
    kv = ModelKV.from_file(_find_config(MODELS[model]))
    g = torch.Generator(device="cpu").manual_seed(seed)
    nblocks = -(-tokens // BLOCK)
    pool = 2 * nblocks + 1
    full = [la for la in kv.layers if la.kind is LayerKind.FULL][:max_layers]
    mla = [la for la in kv.layers if la.kind is LayerKind.MLA][:max_layers]
    lin = [la for la in kv.layers if la.kind is LayerKind.LINEAR][:max_layers]
    groups = []

    def rand(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.randint(-100, 100, shape, generator=g, dtype=torch.int8).view(dtype).to(dev)

    def pick(n: int, cap: int) -> list[int]:
        return torch.randperm(cap, generator=g)[:n].tolist()

    if full:
        head_bytes = full[0].token_bytes // 4  # K and V of 2 KV heads (bf16 after the view)
        shape = (2, pool, BLOCK, 2, head_bytes)
        src = CacheGroup.vllm_attention_gpu([rand(shape, torch.int8).view(torch.bfloat16) for _ in full])
        dst = CacheGroup.vllm_attention_gpu([torch.zeros_like(t) for t in src.caches])
        groups.append(Group(f"{len(full)} GQA layers", src, dst, pick(nblocks, pool), pick(nblocks, pool)))
    if mla:
        lat = mla[0].token_bytes // 2
        src = CacheGroup.mla([rand((pool, BLOCK, lat * 2), torch.int8).view(torch.bfloat16) for _ in mla])
        dst = CacheGroup.mla([torch.zeros_like(t) for t in src.caches])
        groups.append(Group(f"{len(mla)} MLA layers", src, dst, pick(nblocks, pool), pick(nblocks, pool)))
    if lin:
        slot = lin[0].state_bytes + lin[0].conv_bytes
        src = CacheGroup.state([rand((4, slot), torch.int8) for _ in lin])
        dst = CacheGroup.state([torch.zeros_like(t) for t in src.caches])
        groups.append(Group(f"{len(lin)} linear states", src, dst, [3], [1]))
    return groups


# -- timing -------------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)  # the benchmark's clock, never the data path's


def median_s(fn: Callable[[], object], dev: torch.device, reps: int) -> float:
    fn()
    sync(dev)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gbps(nbytes: int, s: float) -> float:
    return nbytes / s / 1e9


# -- 1 and 2: kernels and staging ----------------------------------------------------------------------
def kernels_rows(model: str, groups: list[Group], path: DevicePath, reps: int) -> list[dict[str, Any]]:
    dev = path.device
    rows = []
    for gr in groups:
        n = gr.nbytes
        a = torch.empty(n, dtype=torch.uint8, device=dev)
        b = torch.empty(n, dtype=torch.uint8, device=dev)
        t_copy = median_s(lambda: b.copy_(a), dev, reps)
        buf = torch.empty(n, dtype=torch.uint8, device=dev)
        t_pack = median_s(lambda: pack(gr.src, gr.ids, out=buf, backend=path.backend), dev, reps)
        t_unpack = median_s(lambda: unpack(buf, gr.dst, gr.dst_ids, backend=path.backend), dev, reps)
        host = path.pool.acquire(n)
        t_raw = median_s(lambda: path.seam.copy(host.tensor, a, path.seam.current_stream(dev)), dev, reps)
        host.release()

        def staged() -> None:
            st = path.pack_out(gr.src, gr.ids, n)
            st.wait()
            st.release()

        t_stage = median_s(staged, dev, reps)
        rows.append(
            {
                "model": model,
                "group": gr.name,
                "MiB": n / 2**20,
                "copy": gbps(n, t_copy),
                "pack": gbps(n, t_pack),
                "unpack": gbps(n, t_unpack),
                "raw_d2h": gbps(n, t_raw),
                "staged": gbps(n, t_stage),
            }
        )
    return rows


# -- 3: GPU -> TCP loopback -> GPU ------------------------------------------------------------------
class _Sink:
    """The consumer's flow: land each item in pooled pinned staging, then H2D + scatter on the
    side stream; ``settled`` once every scatter's event fired."""

    def __init__(self, path: DevicePath, groups: dict[str, Group]) -> None:
        self.path, self.groups = path, groups
        self.leases: dict[str, Lease] = {}
        self.pending: list[Staged] = []

    def buffer_for(self, item: ItemSpec) -> memoryview:
        lease = self.path.landing(item.nbytes)
        self.leases[item.name] = lease
        return lease.array.data

    def item_done(self, item: ItemSpec) -> None:
        gr = self.groups[item.name]
        self.pending.append(self.path.unpack_in(self.leases.pop(item.name), gr.dst, gr.dst_ids))

    def settle(self) -> None:
        for p in self.pending:
            p.wait()
            p.release()
        self.pending = []


def transfer_round(groups: list[Group], path: DevicePath, tx: GrpcTcpSender, rx: GrpcTcpReceiver, r: int) -> float:
    """One request, producer to consumer, both on this device; seconds from the first gather
    to the last scatter."""
    byname = {f"{i}": gr for i, gr in enumerate(groups)}
    items = tuple(ItemSpec(k, gr.nbytes, i) for i, (k, gr) in enumerate(byname.items()))
    sink = _Sink(path, byname)
    for gr in groups:
        for t in gr.dst.caches:
            t.zero_()
    sync(path.device)
    t0 = time.perf_counter()
    h_rx = rx.expect(f"r{r}", f"token-{r:016d}", FP, sink, deadline_s=300)
    h = tx.open(rx.endpoint, TransferManifest(f"r{r}", items, FP), f"token-{r:016d}", deadline_s=300)
    staged = [path.pack_out(gr.src, gr.ids, gr.nbytes) for gr in groups]  # the forward's layers
    for (k, _), st in zip(byname.items(), staged):
        st.wait()  # a sender thread in the connector; here the bench thread
        h.send(k, st.host)
    h.done.result(timeout=300)
    h_rx.done.result(timeout=300)
    sink.settle()
    sync(path.device)
    dt = time.perf_counter() - t0
    for st in staged:
        st.release()
    return dt


def check_bit_exact(groups: list[Group]) -> bool:
    for gr in groups:
        for s, d in zip(gr.src.caches, gr.dst.caches):
            bd = gr.src.layout.block_dim
            a = s.index_select(bd, torch.tensor(gr.ids, device=s.device))
            b = d.index_select(bd, torch.tensor(gr.dst_ids, device=d.device))
            if not torch.equal(a.view(torch.uint8), b.view(torch.uint8)):
                return False
    return True


def ceiling_gbps(total: int, conns: int, rounds: int) -> float:
    from transfer import RawRun  # bench/transfer.py: the raw multi-socket ceiling

    rr = RawRun("127.0.0.1", total, conns, rounds)
    try:
        return statistics.median(rr.round() for _ in range(rounds)) * 8 / 1e9
    finally:
        rr.finish()


# -- 4: forward-like matmuls while transfers run ------------------------------------------------------
def matmul_loop(dev: torch.device, size: int, iters: int) -> Callable[[], float]:
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    x = torch.randn(size, size, device=dev, dtype=dt)
    w = torch.randn(size, size, device=dev, dtype=dt)

    def run() -> float:
        sync(dev)
        t0 = time.perf_counter()
        y = x
        for _ in range(iters):
            y = torch.tanh(y @ w) * 0.5
        sync(dev)
        return time.perf_counter() - t0

    return run


@contextlib.contextmanager
def background(fn: Callable[[], object]) -> Iterator[None]:
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            fn()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=120)


# -- driver ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="run the same flow on CPU tensors")
    ap.add_argument("--tiny", action="store_true", help="a few hundred tokens, a few reps (CI)")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--connections", type=int, default=SenderConfig().connections)
    ap.add_argument("--no-append", action="store_true")
    a = ap.parse_args(argv)
    t_start = time.monotonic()
    if a.cpu:
        dev, seam = torch.device("cpu"), HostSeam()
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --cpu")
        dev, seam = torch.device("cuda", torch.cuda.current_device()), None
    tokens = a.tokens or (256 if a.tiny else (1024 if a.cpu else 32768))
    reps = 2 if a.tiny else (3 if a.cpu else 20)
    rounds = 1 if a.tiny else (2 if a.cpu else 3)
    # CPU: the flow, not the figures; a few layers of each kind keep it inside 3 minutes on 2 cores
    max_layers = 2 if a.tiny else (6 if a.cpu else None)
    mm_size, mm_iters = (128, 20) if a.tiny else ((512, 40) if a.cpu else (8192, 50))
    device_name = "CPU" if a.cpu else torch.cuda.get_device_name(dev)

    results: dict[str, Any] = {"kernels": [], "transfer": [], "matmul": None}
    built = {}
    for model in MODELS:
        groups = build(model, tokens, dev, max_layers)
        built[model] = groups
        total = sum(gr.nbytes for gr in groups)
        path = DevicePath(dev, pool_bytes=3 * total + (1 << 20), seam=seam)  # type: ignore[arg-type]
        results["kernels"] += kernels_rows(model, groups, path, reps)
        log(f"{model}: kernels and staging measured")
        rx = GrpcTcpReceiver(ReceiverConfig(listen="127.0.0.1:0"))
        tx = GrpcTcpSender(SenderConfig(connections=a.connections))
        try:
            times = [transfer_round(groups, path, tx, rx, r) for r in range(rounds)]
        finally:
            tx.close()
            rx.close()
        log(f"{model}: {rounds} loopback transfers of {total >> 20} MiB")
        exact = check_bit_exact(groups)
        ceil = ceiling_gbps(total, a.connections, rounds)
        good = total * 8 / statistics.median(times) / 1e9
        results["transfer"].append(
            {"model": model, "MiB": total / 2**20, "goodput": good, "ceiling": ceil, "bit_exact": exact}
        )
        if not exact:
            raise SystemExit(f"{model}: the transferred KV is not bit-exact")

    # 4: a forward-like loop alone, then with a transfer loop beside it (Kimi-Linear-like groups)
    groups = built["Kimi-Linear-like"]
    total = sum(gr.nbytes for gr in groups)
    path = DevicePath(dev, pool_bytes=3 * total + (1 << 20), seam=seam)  # type: ignore[arg-type]
    run = matmul_loop(dev, mm_size, mm_iters)
    run()
    alone = statistics.median(run() for _ in range(max(3, reps // 2)))
    rx = GrpcTcpReceiver(ReceiverConfig(listen="127.0.0.1:0"))
    tx = GrpcTcpSender(SenderConfig(connections=a.connections))
    counter = iter(range(1000, 10**9))
    try:
        with background(lambda: transfer_round(groups, path, tx, rx, next(counter))):
            busy = statistics.median(run() for _ in range(max(3, reps // 2)))
    finally:
        tx.close()
        rx.close()
    log("matmul loop measured alone and beside transfers")
    results["matmul"] = {"alone_ms": alone * 1e3, "busy_ms": busy * 1e3, "slowdown": busy / alone - 1}

    body = render(results, device_name, tokens)
    print(body)
    print(f"\n(total {time.monotonic() - t_start:.0f} s on {device_name}; {machine()})")
    if not a.no_append:
        mode = "CPU tensors (--cpu)" if a.cpu else device_name
        append_benchmarks(
            f"GPU KV data path check (bench/gpu_check.py), {mode}",
            body,
            "goals on a GPU: pack/unpack >= 0.90 of D2D copy; gather+D2H >= 0.90 of raw pinned D2H; "
            "loopback goodput >= 0.85 of the raw multi-socket ceiling; matmul slowdown <= 5%."
            + (" CPU run: the flow only, the ratios are not the GPU goals." if a.cpu else ""),
        )
    return results


def render(res: dict[str, Any], device_name: str, tokens: int) -> str:
    out = [
        f"Device: {device_name}; one request of {tokens} tokens, block {BLOCK}, shuffled block ids; "
        "each group packed in one launch (all its layers).",
        "",
        "| model | group | MiB | D2D copy GB/s | pack GB/s (ratio) | unpack GB/s (ratio) "
        "| raw pinned D2H GB/s | gather+D2H staged GB/s (ratio) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["kernels"]:
        out.append(
            f"| {r['model']} | {r['group']} | {r['MiB']:.1f} | {r['copy']:.1f} | {r['pack']:.1f} "
            f"({r['pack'] / r['copy']:.2f}) | {r['unpack']:.1f} ({r['unpack'] / r['copy']:.2f}) | "
            f"{r['raw_d2h']:.1f} | {r['staged']:.1f} ({r['staged'] / r['raw_d2h']:.2f}) |"
        )
    out += [
        "",
        "| model | MiB per request | device -> TCP loopback -> device goodput Gbit/s | raw multi-socket ceiling "
        "Gbit/s | ratio | bit-exact |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["transfer"]:
        out.append(
            f"| {r['model']} | {r['MiB']:.1f} | {r['goodput']:.2f} | {r['ceiling']:.2f} | "
            f"{r['goodput'] / r['ceiling']:.2f} | {'yes' if r['bit_exact'] else 'NO'} |"
        )
    m = res["matmul"]
    out += [
        "",
        f"Forward-like matmul loop: {m['alone_ms']:.1f} ms alone, {m['busy_ms']:.1f} ms while transfers run "
        f"(slowdown {100 * m['slowdown']:+.1f}%).",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    main()
