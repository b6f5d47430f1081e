"""Pack and unpack a request's paged KV cache (and recurrent states) for the wire.

Public API (stable; the vLLM and SGLang connectors build on it)::

    from prfaas_plugin.kernels import CacheGroup, PagedLayout, pack, unpack, packed_nbytes, window_block_ids

    group = CacheGroup.vllm_attention_cpu(per_layer_tensors)   # or .vllm_attention_gpu / .mla / .state
    # group = CacheGroup(tensors, PagedLayout.of(tensors[0], block_dim=0))   # any other layout
    buf = pack(group, block_ids)                 # uint8, all layers of the group, ONE launch on GPU
    unpack(buf, dst_group, dst_block_ids)        # scatter into the receiver's own block ids
    nbytes = packed_nbytes(group, len(block_ids), fp8=False)
    win = window_block_ids(block_ids, num_tokens, window, block_size)   # sliding-window tail

Buffer format: ``[layer, *outer (K/V), block_in_request, row bytes]`` in cache dtype; with
``fp8=True`` the e4m3 payload in that order, then (16-byte aligned) fp32 scales
``[layer, outer, block, head]``. Both sides must use the same layout shape, dtype and fp8 flag.

Backends: Triton kernels for tensors on an accelerator, torch ops for CPU tensors; pass
``backend="triton"`` to force the kernels (e.g. on CPU under ``TRITON_INTERPRET=1``).
See docs/kernels.md.
"""

from __future__ import annotations

from .api import Backend, CacheGroup, pack, packed_nbytes, unpack
from .layout import PagedLayout
from .window import WindowBlocks, window_block_ids, window_block_range

__all__ = [
    "Backend",
    "CacheGroup",
    "PagedLayout",
    "WindowBlocks",
    "pack",
    "packed_nbytes",
    "unpack",
    "window_block_ids",
    "window_block_range",
]
