"""Every Triton kernel of prfaas_plugin.kernels, run by the Triton interpreter on CPU, must
equal the torch path bit for bit (the torch path is itself checked against a naive reference
in test_kernels_torch.py)."""

from __future__ import annotations

import os

# Must be set before triton.jit decorates the kernels (module import below); other test
# modules may have imported torch or even triton already, which is fine: the interpreter
# switch is read when the kernels are decorated, and we re-decorate if needed.
os.environ["TRITON_INTERPRET"] = "1"

import importlib

import pytest
import torch

triton = pytest.importorskip("triton")

from prfaas_plugin.kernels import CacheGroup, pack, packed_nbytes, unpack, window_block_ids
from tests.kernels_helpers import (
    FAMILIES,
    PACK_IDS,
    UNPACK_DST,
    UNPACK_SRC,
    blocks_view,
    like_group,
    make_group,
    reference_pack,
)


@pytest.fixture(scope="module", autouse=True)
def interpreted_kernels():
    from triton.runtime.interpreter import InterpretedFunction

    from prfaas_plugin.kernels import triton_ops

    if not isinstance(triton_ops._gather_rows, InterpretedFunction):
        triton_ops = importlib.reload(triton_ops)
    assert isinstance(triton_ops._gather_rows, InterpretedFunction), "TRITON_INTERPRET did not take effect"
    return triton_ops


def _poisoned(n: int, poison: int) -> torch.Tensor:
    return torch.full((n + 8,), poison, dtype=torch.uint8)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_gather_kernel_equals_torch(name: str) -> None:
    group = make_group(name, seed=11)
    n = packed_nbytes(group, len(PACK_IDS))
    want = pack(group, PACK_IDS, backend="torch")
    assert torch.equal(want, reference_pack(group, PACK_IDS))
    for poison in (0xA5, 0x5A):
        out = _poisoned(n, poison)
        pack(group, PACK_IDS, out=out, backend="triton")
        assert torch.equal(out[:n], want)
        assert bool((out[n:] == poison).all())


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_scatter_kernel_equals_torch(name: str) -> None:
    src = make_group(name, seed=12)
    buf = pack(src, UNPACK_SRC, backend="torch")
    a, b = like_group(src, seed=13), like_group(src, seed=13)
    unpack(buf, a, UNPACK_DST, backend="torch")
    unpack(buf, b, UNPACK_DST, backend="triton")
    for x, y in zip(a.caches, b.caches):
        assert torch.equal(blocks_view(x, a.layout), blocks_view(y, b.layout))
    # and the scatter really moved the data (not a no-op on both sides)
    s0 = blocks_view(src.caches[0], src.layout)
    assert torch.equal(blocks_view(b.caches[0], b.layout)[:, UNPACK_DST[1]], s0[:, UNPACK_SRC[1]])


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if f[2]] + ["mamba2_ssm", "big_row_state"])
def test_fp8_kernels_equal_torch(name: str) -> None:
    src = make_group(name, seed=14)
    n = packed_nbytes(src, len(PACK_IDS), fp8=True)
    want = pack(src, PACK_IDS, fp8=True, lossy_states=True, backend="torch")
    for poison in (0xA5, 0x5A):
        out = _poisoned(n, poison)
        pack(src, PACK_IDS, out=out, fp8=True, lossy_states=True, backend="triton")
        assert torch.equal(out[:n], want)
        assert bool((out[n:] == poison).all())
    buf = pack(src, UNPACK_SRC, fp8=True, lossy_states=True, backend="torch")
    a, b = like_group(src, seed=15), like_group(src, seed=15)
    unpack(buf, a, UNPACK_DST, fp8=True, lossy_states=True, backend="torch")
    unpack(buf, b, UNPACK_DST, fp8=True, lossy_states=True, backend="triton")
    for x, y in zip(a.caches, b.caches):
        assert torch.equal(x, y)


def test_fp8_rounding_ties_and_subnormals() -> None:
    """One head whose amax is 448 (scale exactly 1), holding every midpoint between adjacent
    e4m3 values, values just either side of them, and subnormals: the kernel's integer
    rounding must match torch's round-to-nearest-even cast everywhere."""
    codes = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448 (0x7e)
    mids = (codes[:-1] + codes[1:]) / 2
    eps = mids * 2.0**-12 + 2.0**-20
    vals = torch.cat([codes, mids, mids + eps, mids - eps])
    vals = torch.cat([vals, -vals])
    width = 64
    pad = (-vals.numel()) % width
    vals = torch.cat([vals, torch.full((pad,), 448.0)])
    cache = vals.reshape(1, -1, width).to(torch.float32)  # [NB=1, BS, latent]
    group = CacheGroup.mla([cache])
    want = pack(group, [0], fp8=True, backend="torch")
    got = pack(group, [0], fp8=True, backend="triton")
    assert torch.equal(got, want)
    # and torch's own cast is the rounding we claim
    assert torch.equal(want[: vals.numel()], vals.to(torch.float8_e4m3fn).view(torch.uint8))


def test_sliding_window_mid_block_via_triton() -> None:
    group = make_group("attn_gpu", seed=16)
    table = [8, 3, 6, 1, 9, 0, 4]
    w = window_block_ids(table, num_tokens=27, window=10, block_size=4)  # tokens 17..26 -> blocks 4..6
    assert w.first == 4 and w.block_ids == [9, 0, 4]
    assert torch.equal(pack(group, w.block_ids, backend="triton"), reference_pack(group, w.block_ids))


def test_layers_in_separate_allocations_one_launch(interpreted_kernels, monkeypatch) -> None:
    """All layers go through a single kernel launch even though each layer is its own tensor."""
    group = make_group("mla", seed=17)
    calls = []
    real = interpreted_kernels._gather_rows

    class Counting:
        def __getitem__(self, grid):
            calls.append(grid)
            return real[grid]

    monkeypatch.setattr(interpreted_kernels, "_gather_rows", Counting())
    out = pack(group, PACK_IDS, backend="triton")
    assert len(calls) == 1 and calls[0] == (group.num_layers * len(PACK_IDS),)
    assert torch.equal(out, reference_pack(group, PACK_IDS))
