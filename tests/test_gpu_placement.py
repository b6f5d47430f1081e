"""The GPU data path of both engine adapters, run on a CPU-only machine.

``FakeTensorMode`` gives tensors that claim to live on ``cuda`` and refuses an op that mixes
devices (a CPU index into a CUDA cache raises ``FakeTensorDeviceMismatchError``), so the real
producer and consumer code of the vLLM connector (``WorkerSide._send_layer`` and ``_Sink``) and
of the SGLang backend (``CudaSpace``) runs here as it would on a GPU, without moving any byte.
The CUDA calls streams, events and pinned memory need are recorded by ``RecordingSeam`` (the
seam of ``kernels/device.py``), and every cross-device copy, whichever way it is issued, is
caught by a dispatch mode that notes which stream was current. The assertions are the rules of
the GPU path: cache and gather buffers on the device, staging pinned on the host and taken from
the pool, no host<->device copy on the forward stream, no device-wide synchronize.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from prfaas_plugin.engines.sglang.memory import CudaSpace, Region
from prfaas_plugin.kernels.device import PinnedPool

DEV = torch.device("cuda", 0)


@dataclass(eq=False)
class _Stream:
    name: str


@dataclass(eq=False)
class _Event:
    stream: _Stream


@dataclass
class RecordingSeam:
    """The CUDA calls of the data path, recorded; ``pinned`` buffers are real host tensors
    (so the transfer engine's memoryviews work) noted as page-locked."""

    forward: _Stream = field(default_factory=lambda: _Stream("forward"))
    side: _Stream = field(default_factory=lambda: _Stream("side"))
    current: _Stream | None = None
    pinned_buffers: list[torch.Tensor] = field(default_factory=list)
    host_arrays: list[np.ndarray] = field(default_factory=list)  # real bytes behind each buffer
    copies: list[tuple[str, str, str]] = field(default_factory=list)  # (src dev, dst dev, stream)
    waits: list[tuple[str, str]] = field(default_factory=list)  # (waiting stream, event's stream)
    host_waits: list[str] = field(default_factory=list)
    staged: list[tuple[str, str]] = field(default_factory=list)  # (src, dst) of the seam's copies

    def __post_init__(self) -> None:
        self.current = self.forward

    def current_stream(self, device: torch.device) -> _Stream:
        assert device.type == "cuda", device
        assert self.current is not None
        return self.current

    def side_stream(self, device: torch.device) -> _Stream:
        return self.side

    @contextlib.contextmanager
    def stream(self, stream: _Stream) -> Iterator[None]:
        prev, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = prev

    def record(self, stream: _Stream) -> _Event:
        return _Event(stream)

    def wait(self, stream: _Stream, event: _Event) -> None:
        self.waits.append((stream.name, event.stream.name))

    def query(self, event: _Event) -> bool:
        return True

    def host_wait(self, event: _Event) -> None:
        self.host_waits.append(event.stream.name)

    def pinned(self, nbytes: int) -> torch.Tensor:
        t = torch.zeros(nbytes, dtype=torch.uint8)  # fake, like every tensor in the test
        self.pinned_buffers.append(t)
        self.host_arrays.append(np.zeros(nbytes, dtype=np.uint8))
        return t

    def host_view(self, pinned: torch.Tensor) -> np.ndarray:
        i = next(i for i, b in enumerate(self.pinned_buffers) if b is pinned)
        return self.host_arrays[i]

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: _Stream) -> None:
        assert stream is self.current, "a copy issued on a stream that is not current"
        self.staged.append((src.device.type, dst.device.type))
        # the bytes are fake; the dispatch mode below records the copy with the current stream
        CopyWatch.active.note(src.device, dst.device, self)


class CopyWatch(TorchDispatchMode):
    """Every host<->device copy, through the seam or not (``.to``, ``copy_``, ``.cuda()``),
    with the stream that was current when it was issued."""

    active: CopyWatch

    def __init__(self, seam: RecordingSeam) -> None:
        super().__init__()
        self.seam = seam
        CopyWatch.active = self

    def note(self, src: torch.device, dst: torch.device, seam: RecordingSeam) -> None:
        if src.type != dst.type:
            assert seam.current is not None
            seam.copies.append((src.type, dst.type, seam.current.name))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst_dev = args[0].device if func is torch.ops.aten.copy_.default else kwargs.get("device")
            if isinstance(src, torch.Tensor) and dst_dev is not None:
                self.note(src.device, torch.device(dst_dev), self.seam)
        return func(*args, **kwargs)


@pytest.fixture
def gpu(monkeypatch):
    """Fake CUDA tensors, the recording seam, and tripwires on every device-wide synchronize."""
    seam = RecordingSeam()
    syncs: list[str] = []

    def tripwire(name: str) -> Any:
        def sync(*_a: Any, **_k: Any) -> None:
            syncs.append(name)

        return sync

    monkeypatch.setattr(torch.cuda, "synchronize", tripwire("torch.cuda.synchronize"))
    monkeypatch.setattr(torch.cuda.Stream, "synchronize", tripwire("Stream.synchronize"), raising=False)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: seam.current)
    with FakeTensorMode(allow_non_fake_inputs=True), CopyWatch(seam):
        yield SimpleNamespace(seam=seam, syncs=syncs)


def _is_pool_staging(seam: RecordingSeam, lease: Any) -> bool:
    """``lease`` is host memory inside one of the seam's pinned allocations."""
    if lease is None or lease.tensor.device.type != "cpu" or lease.pool.buffer.device.type != "cpu":
        return False
    return any(lease.pool.buffer is b for b in seam.pinned_buffers) and _in_pinned(seam, lease.array)


def _in_pinned(seam: RecordingSeam, arr: np.ndarray) -> bool:
    ptr = np.asarray(arr).ctypes.data
    return any(b.ctypes.data <= ptr < b.ctypes.data + b.size for b in seam.host_arrays)


def _check_rules(g: SimpleNamespace, expect: set[tuple[str, str]]) -> None:
    s = g.seam
    assert s.copies, "no host<->device copy went through the data path"
    on_forward = [c for c in s.copies if c[2] == "forward"]
    assert not on_forward, f"host<->device copies issued on the forward stream: {on_forward}"
    directions = {(a, b) for a, b, _ in s.copies}
    assert expect <= directions <= {("cuda", "cpu"), ("cpu", "cuda")}, directions
    assert not g.syncs, f"device-wide synchronize called: {g.syncs}"
    assert ("forward", "forward") not in s.waits, "the forward stream waited on something"
    assert all(w == "side" for w, _ in s.waits)


# -- vLLM ------------------------------------------------------------------------------------------
BLOCK, NUM_BLOCKS, LAYERS = 4, 16, ("model.layers.0.attn", "model.layers.1.attn")


def _vllm_worker(seam: RecordingSeam) -> Any:
    pytest.importorskip("vllm")
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from prfaas_plugin.engines.vllm import packing
    from prfaas_plugin.engines.vllm.options import Options
    from prfaas_plugin.engines.vllm.worker import WorkerSide

    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=8, dtype=torch.float16)
    kv_cache_config = SimpleNamespace(
        num_blocks=NUM_BLOCKS, kv_cache_groups=[SimpleNamespace(kv_cache_spec=spec, layer_names=list(LAYERS))]
    )
    vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(rank=0, tensor_parallel_size=1))
    w = WorkerSide(vllm_config, kv_cache_config, Options(), producer=True, consumer=True)
    w.packer = packing.Packer(1 << 20, seam=seam, backend="torch")  # Triton needs a real GPU
    # both vLLM GPU layouts: [2, NB, BS, H, D] (block dim 1) and [NB, H, BS, 2D] (block dim 0)
    w.parts = {
        LAYERS[0]: [(torch.randn(2, NUM_BLOCKS, BLOCK, 2, 8, dtype=torch.float16, device=DEV), 1)],
        LAYERS[1]: [(torch.randn(NUM_BLOCKS, 2, BLOCK, 16, dtype=torch.float16, device=DEV), 0)],
    }
    return w


@dataclass
class _Handle:
    sent: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    done: Any = field(default_factory=lambda: SimpleNamespace(done=lambda: False))

    def send(self, name: str, data: torch.Tensor) -> None:
        self.sent.append((name, data))


def test_vllm_producer_gathers_on_the_device_and_sends_pinned_staging(gpu):
    from prfaas_plugin.engines.vllm.meta import Transfer
    from prfaas_plugin.engines.vllm.worker import _Leg, _Send

    w = _vllm_worker(gpu.seam)
    t = Transfer("r", "x", "t", 10.0, 10, ([3, 7, 9],), "127.0.0.1:1")
    h = _Handle()
    w._sends["r"] = _Send([_Leg(h)], t, w._plan(t))
    for lname in LAYERS:
        w._send_layer("r", lname)
    if w._stage_exec is not None:
        w._stage_exec.shutdown(wait=True)
    assert [n for n, _ in h.sent] == [f"g0.b0.n3.p0.{n}" for n in LAYERS]
    staged = w._sends["r"].buffers
    assert len(staged) == len(LAYERS)
    for (_, data), st, (x, bdim) in zip(h.sent, staged, (w.parts[n][0] for n in LAYERS)):
        assert x.device.type == "cuda"
        assert data is st.host and data.device.type == "cpu"
        assert _is_pool_staging(gpu.seam, st.lease), "sent bytes are not pinned staging from the pool"
        assert data.numel() == 3 * x.numel() // NUM_BLOCKS * x.element_size()
    # each layer: gathered into a device buffer, which is copied to the staging
    assert gpu.seam.staged == [("cuda", "cpu")] * len(LAYERS), "the gather buffer is not on the device"
    _check_rules(gpu, {("cuda", "cpu")})
    assert gpu.seam.waits == [("side", "forward")] * len(LAYERS), "the side stream must wait on the forward"


def test_vllm_producer_aborted_mid_chunked_prefill_gives_its_staging_back(gpu):
    """The chunks sent before the abort hold pinned staging; dropping the transfer must return
    it to the pool, or the pool fills and a later forward pass blocks on it."""
    from prfaas_plugin.engines.vllm.meta import Transfer
    from prfaas_plugin.engines.vllm.worker import _Leg, _Send

    w = _vllm_worker(gpu.seam)
    # 12 tokens in 4-token slices: this step finished the first 4 (chunked prefill)
    t = Transfer("r", "x", "t" * 32, 10.0, 12, ([3, 7, 9],), "127.0.0.1:1", ready_tokens=4, slice_tokens=4)
    h = _Handle()
    aborted: list[str] = []
    h.abort = aborted.append  # type: ignore[attr-defined]
    w._sends["r"] = _Send([_Leg(h)], t, w._plan(t))
    w.meta = SimpleNamespace(sends=[t], loads=[], aborts=[])
    for lname in LAYERS:
        w._send_layer("r", lname)
    if w._stage_exec is not None:
        w._stage_exec.shutdown(wait=True)
    assert h.sent and w.packer.pool_stats()["in_use_bytes"] > 0
    sending, _, _ = w.transfer_results({"r"})  # vLLM finished the request before its last chunk
    assert sending == set() and aborted and "r" not in w._sends
    assert w.packer.pool_stats()["in_use_bytes"] == 0


def test_vllm_consumer_lands_in_pinned_staging_and_scatters_on_the_side_stream(gpu):
    from prfaas_plugin.engines.vllm.meta import Transfer
    from prfaas_plugin.engines.vllm.worker import _Sink
    from prfaas_plugin.transfer import ItemSpec

    w = _vllm_worker(gpu.seam)
    t = Transfer("r", "x", "t", 10.0, 10, ([3, 7, 9],))
    sink = _Sink(w, t)
    for i, lname in enumerate(LAYERS):
        x, bdim = w.parts[lname][0]
        item = ItemSpec(f"g0.b0.n3.p0.{lname}", 3 * x.numel() // NUM_BLOCKS * x.element_size(), i)
        view, landed = sink.land(item)
        assert _is_pool_staging(gpu.seam, landed) and memoryview(view).nbytes == item.nbytes
        sink.commit(item, landed)
    assert sink.settled()
    assert gpu.seam.staged == [("cpu", "cuda")] * len(LAYERS), "staging must reach a device buffer"
    assert w.packer.pool_stats()["in_use_bytes"] == 0, "staging not returned to the pool"
    _check_rules(gpu, {("cpu", "cuda")})


def test_vllm_device_mismatch_is_caught_by_the_fake_tensors(gpu):
    """The check this file relies on: a CPU index into a CUDA cache raises under fake CUDA."""
    from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

    cache = torch.empty(2, NUM_BLOCKS, BLOCK, 2, 8, device=DEV)
    with pytest.raises(FakeTensorDeviceMismatchError):
        cache.index_select(1, torch.tensor([1, 2]))


# -- SGLang ----------------------------------------------------------------------------------------
ITEM, CAP = 96, 12


class _FakeCudaSpace(CudaSpace):
    """SGLang hands raw device pointers; here the pool behind a region is a fake CUDA tensor."""

    def _matrix(self, region: Region) -> Any:
        return torch.empty(region.capacity, region.item_len, dtype=torch.uint8, device=self._device)


def test_sglang_cuda_space_gathers_and_scatters_through_the_pool(gpu):
    space = _FakeCudaSpace("cuda:0", pool_bytes=1 << 16, seam=gpu.seam, backend="torch")
    region = Region(1 << 20, CAP * ITEM, ITEM, "kv[0]")
    got = space.gather(region, [7, 2, 9], after=space.record_event())
    assert got.shape == (3, ITEM)
    assert _in_pinned(gpu.seam, got)
    assert space.pool_stats()["in_use_bytes"] > 0, "the staging stays leased while the caller holds it"
    assert gpu.seam.waits == [("side", "forward")]
    assert gpu.seam.host_waits == ["side"], "the host waits on the copy's event only"
    del got
    view, in_place = space.landing(region, np.array([4, 1]))
    assert not in_place
    space.scatter(region, np.array([4, 1]), view)
    del view
    assert space.pool_stats()["in_use_bytes"] == 0, "staging not returned to the pool"
    assert space.pool_stats()["capacity_bytes"] == 1 << 16
    _check_rules(gpu, {("cuda", "cpu"), ("cpu", "cuda")})


def test_pinned_pool_backpressure_and_reuse() -> None:
    seam = RecordingSeam()
    pool = PinnedPool(1024, seam)
    a = pool.acquire(600)
    with pytest.raises(TimeoutError, match="full"):
        pool.acquire(600, timeout=0.05)
    with pytest.raises(TimeoutError, match="does not fit"):
        pool.acquire(2048, timeout=0)
    a.release()
    b = pool.acquire(1000)
    assert b.offset == 0 and pool.stats()["peak_in_use_bytes"] == 1024 and pool.stats()["waits"] == 1
    b.release()
    assert pool.stats()["in_use_bytes"] == 0 and len(seam.pinned_buffers) == 1, "allocated once"
