"""How one cache group's per-layer tensors are paged, and the packed-buffer layout that follows.

Every engine layout we meet (vLLM flash ``[2, NB, BS, H, D]``, vLLM CPU ``[NB, 2, ...]``, MLA
``[NB, BS, 576]``, Mamba/GDN/KDA state pages as raw ``int8 [NB, ...]``) is one tensor per layer
with a single *block dimension*. Dims before it are "outer" (e.g. K/V), dims after it form one
*row*: the bytes of a block that must be contiguous. Describing a group this way lets one
kernel move any family, and lets the packed buffer be defined once:
``buffer = [layer, *outer, block_in_request, *row]``, all layers of a group in one buffer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PagedLayout:
    """Shape contract for all layers of one cache group.

    ``head_axis`` names the axis *within the row* (dims after the block dim) that gets its own
    fp8 scale; ``None`` means one scale per row (MLA latents). ``lossless`` marks recurrent
    states: fp8 is refused for them unless the caller forces it, because a quantised state
    error compounds over every later decode step.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    block_dim: int
    head_axis: int | None = None
    lossless: bool = False

    def __post_init__(self) -> None:
        if not self.shape:
            raise ValueError("PagedLayout: a cache tensor needs at least one dim (the block dim)")
        if not 0 <= self.block_dim < len(self.shape):
            raise ValueError(f"PagedLayout: block_dim {self.block_dim} out of range for shape {self.shape}")
        if any(s <= 0 for s in self.shape):
            raise ValueError(f"PagedLayout: empty dims in shape {self.shape}")
        if self.head_axis is not None and not 0 <= self.head_axis < len(self.row_shape):
            raise ValueError(f"PagedLayout: head_axis {self.head_axis} out of range for row shape {self.row_shape}")

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.shape[self.block_dim]

    @property
    def outer_shape(self) -> tuple[int, ...]:
        return self.shape[: self.block_dim]

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape[self.block_dim + 1 :]

    @property
    def num_outer(self) -> int:
        return math.prod(self.outer_shape)

    @property
    def row_elems(self) -> int:
        return math.prod(self.row_shape)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def row_bytes(self) -> int:
        return self.row_elems * self.itemsize

    @property
    def num_heads(self) -> int:
        """Scale groups per row: the head axis length, or 1."""
        return 1 if self.head_axis is None else self.row_shape[self.head_axis]

    @property
    def head_split(self) -> tuple[int, int, int]:
        """The row seen as ``[pre, heads, post]``: what the fp8 kernels index."""
        if self.head_axis is None:
            return 1, 1, self.row_elems
        rs = self.row_shape
        return math.prod(rs[: self.head_axis]), rs[self.head_axis], math.prod(rs[self.head_axis + 1 :])

    # ---- constructors for the engine layouts ----------------------------------------------
    @classmethod
    def of(
        cls,
        tensor: torch.Tensor,
        block_dim: int,
        head_axis: int | None = None,
        lossless: bool = False,
    ) -> PagedLayout:
        """Generic layout of a per-layer cache tensor."""
        return cls(tuple(tensor.shape), tensor.dtype, block_dim, head_axis, lossless)

    @classmethod
    def vllm_attention_gpu(cls, tensor: torch.Tensor) -> PagedLayout:
        """The K/V-split flash layout ``[2, num_blocks, block_size, kv_heads, head_size]``
        (vLLM <= 0.31 flash/flashinfer; still what many GPU kernels allocate)."""
        _expect_rank(tensor, 5, "vllm_attention_gpu", "[2, NB, BS, H, D]")
        if tensor.shape[0] != 2:
            raise ValueError(f"vllm_attention_gpu: dim 0 must be K/V (2), got shape {tuple(tensor.shape)}")
        return cls.of(tensor, block_dim=1, head_axis=1)

    @classmethod
    def vllm_attention_cpu(cls, tensor: torch.Tensor) -> PagedLayout:
        """vLLM 0.32's block-first layout ``[num_blocks, kv_heads, block_size, 2 * head_size]``
        (logical ``[B, H, N, C]``, KVCacheLayout.LBHNC; the CPU backend's only layout and the
        flash default): K and V of a head share one fp8 scale per block."""
        _expect_rank(tensor, 4, "vllm_attention_cpu", "[NB, H, BS, 2*D]")
        if tensor.shape[-1] % 2:
            raise ValueError(f"vllm_attention_cpu: last dim must hold K and V (even), got {tuple(tensor.shape)}")
        return cls.of(tensor, block_dim=0, head_axis=0)

    @classmethod
    def mla(cls, tensor: torch.Tensor) -> PagedLayout:
        """MLA latent pages ``[num_blocks, block_size, kv_lora_rank + rope_dim]``."""
        _expect_rank(tensor, 3, "mla", "[NB, BS, latent]")
        return cls.of(tensor, block_dim=0, head_axis=None)

    @classmethod
    def state(cls, tensor: torch.Tensor) -> PagedLayout:
        """Recurrent state slots (Mamba2 / GDN / KDA / Lightning temporal or conv state, or the
        raw ``int8 [NB, ..., page_bytes]`` pages vLLM hands over with HMA): slot dim first,
        moved byte for byte, lossless."""
        return cls.of(tensor, block_dim=0, head_axis=None, lossless=True)

    # ---- checks ---------------------------------------------------------------------------
    def check(self, caches: Sequence[torch.Tensor]) -> None:
        """Refuse tensors that do not match, so a bad registration fails loudly, not as garbage."""
        if len(caches) == 0:
            raise ValueError("no cache tensors given for this group")
        dev = caches[0].device
        for i, t in enumerate(caches):
            if tuple(t.shape) != self.shape or t.dtype != self.dtype:
                raise ValueError(
                    f"layer {i}: tensor {tuple(t.shape)} {t.dtype} does not match layout {self.shape} {self.dtype}"
                )
            if t.device != dev:
                raise ValueError(f"layer {i}: on {t.device}, layer 0 on {dev}")
            if not row_is_contiguous(t, self.block_dim):
                raise ValueError(
                    f"layer {i}: the dims after the block dim must be contiguous "
                    f"(strides {t.stride()}); a block row must be one run of bytes"
                )


def row_is_contiguous(t: torch.Tensor, block_dim: int) -> bool:
    expected = 1
    for size, stride in zip(reversed(t.shape[block_dim + 1 :]), reversed(t.stride()[block_dim + 1 :])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _expect_rank(t: torch.Tensor, rank: int, name: str, form: str) -> None:
    if t.dim() != rank:
        raise ValueError(f"{name}: expected {form}, got shape {tuple(t.shape)}")
