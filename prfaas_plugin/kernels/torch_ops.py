"""CPU (and fallback) pack/unpack with plain torch ops.

Speed comes from doing one ``index_select(out=)`` per layer and K/V half over whole block rows
viewed as integer words (a memcpy per row inside torch), never advanced indexing (which
allocates) and never per-block Python loops. These functions are also the reference the Triton
kernels are tested against, bit for bit.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from .layout import PagedLayout
from .plan import FP8_MAX, PackGeometry, outer_offsets_bytes, word_dtype


def row_views(caches: Sequence[torch.Tensor], layout: PagedLayout, wbytes: int) -> Iterator[torch.Tensor]:
    """Every (layer, outer) slice of the caches as a ``[num_blocks, row_words]`` word view,
    in buffer order. Built on the storage so any block stride (padded pages) is honoured."""
    wdt = word_dtype(wbytes)
    row_words = layout.row_bytes // wbytes
    for t in caches:
        storage = t.untyped_storage()
        start = t.data_ptr() - storage.data_ptr()
        bstride = t.stride(layout.block_dim) * layout.itemsize // wbytes
        for ob in outer_offsets_bytes(t, layout):
            v = torch.empty(0, dtype=wdt, device=t.device)
            v.set_(storage, (start + ob) // wbytes, (layout.num_blocks, row_words), (bstride, 1))
            yield v


def _typed_row_views(caches: Sequence[torch.Tensor], layout: PagedLayout) -> Iterator[torch.Tensor]:
    """Same slices in the cache dtype, shaped ``[num_blocks, pre, heads, post]`` for fp8."""
    pre, heads, post = layout.head_split
    for v in row_views(caches, layout, layout.itemsize):
        yield v.view(layout.dtype).view(layout.num_blocks, pre, heads, post)


@contextlib.contextmanager
def one_intraop_thread() -> Iterator[None]:
    """Run the per-layer copies on one intra-op thread, then restore the setting.

    Each copy is a few MB; splitting it over OpenMP threads buys nothing (one core saturates
    memory bandwidth for memcpy-class work) and on a loaded host the fork/join barriers of
    hundreds of calls cost several times the copies (bench/kernels.py shows it).
    With torch's OpenMP backend the setting is per calling thread."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


#: Slices smaller than this on average are copied on the calling thread: below it the pool's
#: hand-offs and the GIL between copies cost more than a second core gives (bench/kernels.py:
#: 48 state slices of 0.8 MB went from 0.65 to 0.46 of memcpy when split).
PARALLEL_MIN_SLICE_BYTES = 2 << 20
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _for_each_layer(count: int, nbytes: int, copy: Callable[[int], object]) -> None:
    """Run ``copy(i)`` for every (layer, K/V) slice ``i``: on the calling thread, or split over
    ``torch.get_num_threads()`` pool threads when the work is large. torch releases the GIL
    inside each copy, so the layers' memcpys run on several cores at once, which is what a
    multi-threaded ``copy_`` of the same bytes (the memcpy baseline) does too."""
    workers = min(torch.get_num_threads(), count)
    if workers <= 1 or nbytes < PARALLEL_MIN_SLICE_BYTES * count:
        with one_intraop_thread():
            for i in range(count):
                copy(i)
        return
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < workers:
            if _pool is not None:
                _pool.shutdown(wait=False)  # its idle threads exit; the new pool replaces it
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prfaas-kernels")
        pool = _pool

    def part(k: int) -> None:
        with one_intraop_thread():
            for i in range(k, count, workers):
                copy(i)

    for f in [pool.submit(part, k) for k in range(workers)]:
        f.result()


def pack_raw(
    views: Sequence[torch.Tensor], layout: PagedLayout, idx: torch.Tensor, out: torch.Tensor, wbytes: int
) -> None:
    """``views``: ``row_views`` of the group's caches for this word size (built once per group)."""
    n = idx.numel()
    dst = out.narrow(0, 0, n * layout.row_bytes * len(views)).view(word_dtype(wbytes))  # narrow: fake CUDA too
    dst = dst.view(-1, n, layout.row_bytes // wbytes)
    slots = dst.unbind(0)  # one C call for every layer's destination view
    _for_each_layer(len(views), dst.numel() * wbytes, lambda i: torch.index_select(views[i], 0, idx, out=slots[i]))


def unpack_raw(
    buf: torch.Tensor, views: Sequence[torch.Tensor], layout: PagedLayout, idx: torch.Tensor, wbytes: int
) -> None:
    n = idx.numel()
    src = buf.narrow(0, 0, n * layout.row_bytes * len(views)).view(word_dtype(wbytes))
    src = src.view(-1, n, layout.row_bytes // wbytes)
    if idx.device.type == "cpu":
        # numpy's fancy assignment copies each row with one memcpy and never forks threads:
        # 1.3-1.6x faster than index_copy_ here (bench/kernels.py).
        idn, srcn = idx.numpy(), src.numpy()

        def scatter(i: int) -> None:
            views[i].numpy()[idn] = srcn[i]

        _for_each_layer(len(views), src.numel() * wbytes, scatter)
        return
    for dst, part in zip(views, src.unbind(0)):
        dst.index_copy_(0, idx, part)


def fp8_views(buf: torch.Tensor, geo: PackGeometry, layout: PagedLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp8 payload ``[rows, pre, heads, post]`` and scales ``[rows, heads]`` inside ``buf``."""
    pre, heads, post = layout.head_split
    payload = buf[: geo.payload_bytes].view(torch.float8_e4m3fn).view(geo.num_rows, pre, heads, post)
    scales = buf[geo.scales_offset : geo.nbytes].view(torch.float32).view(geo.num_rows, heads)
    return payload, scales


def quantise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [rows, pre, heads, post]`` -> (e4m3 values, fp32 scale per row and head).

    scale = amax / 448 so the largest magnitude maps onto the largest finite e4m3 value; an
    all-zero head gets scale 1. Division (not a reciprocal multiply) and a clamp before the
    cast keep this bit-identical to the Triton kernel."""
    xf = x.float()
    amax = xf.abs().amax(dim=(1, 3))
    scale = amax / FP8_MAX
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = (xf / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantise(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale[:, None, :, None]).to(dtype)


def pack_fp8(
    caches: Sequence[torch.Tensor], layout: PagedLayout, idx: torch.Tensor, out: torch.Tensor, geo: PackGeometry
) -> None:
    payload, scales = fp8_views(out, geo, layout)
    n = idx.numel()
    for i, src in enumerate(_typed_row_views(caches, layout)):
        q, s = quantise(src.index_select(0, idx))
        payload[i * n : (i + 1) * n].copy_(q)
        scales[i * n : (i + 1) * n].copy_(s)


def unpack_fp8(
    buf: torch.Tensor, caches: Sequence[torch.Tensor], layout: PagedLayout, idx: torch.Tensor, geo: PackGeometry
) -> None:
    payload, scales = fp8_views(buf, geo, layout)
    n = idx.numel()
    for i, dst in enumerate(_typed_row_views(caches, layout)):
        dst.index_copy_(0, idx, dequantise(payload[i * n : (i + 1) * n], scales[i * n : (i + 1) * n], layout.dtype))
