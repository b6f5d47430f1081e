"""Turning what adapters hand us (bytes, numpy arrays, CPU torch tensors, memoryviews) into
flat byte views *without copying*, and refusing anything that would need a copy."""

from __future__ import annotations

from typing import Any


def is_device_tensor(obj: Any) -> bool:
    """A torch tensor that does not live in host memory (CUDA, ROCm, XPU...)."""
    dev = getattr(obj, "device", None)
    return dev is not None and getattr(dev, "type", "cpu") != "cpu" and hasattr(obj, "untyped_storage")


def byte_view(obj: Any, *, writable: bool = False) -> memoryview:
    """A 1-D unsigned-byte view of ``obj``'s memory. Raises ValueError for non-contiguous data
    (a silent ``.contiguous()`` copy would break the zero-copy and ownership contract)."""
    if hasattr(obj, "untyped_storage") and hasattr(obj, "is_contiguous"):  # torch.Tensor
        if is_device_tensor(obj):
            raise ValueError("device tensors go through the staging path, not byte_view")
        if not obj.is_contiguous():
            raise ValueError("tensor is not contiguous; pack it first")
        import torch

        flat = obj.reshape(-1)
        if flat.dtype != torch.uint8:
            flat = flat.view(torch.uint8) if flat.numel() else flat.to(torch.uint8)
        mv = memoryview(flat.numpy())
    elif hasattr(obj, "__array_interface__") and not isinstance(obj, (bytes, bytearray, memoryview)):
        import numpy as np

        arr = np.asarray(obj)
        if not arr.flags.c_contiguous:
            raise ValueError("array is not C-contiguous; pack it first")
        mv = arr.reshape(-1).view(np.uint8).data
    else:
        mv = memoryview(obj)
    if not mv.contiguous:
        raise ValueError("buffer is not contiguous")
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    if writable and mv.readonly:
        raise ValueError("buffer is read-only; the receiver needs a writable destination")
    return mv
