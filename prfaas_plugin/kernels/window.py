"""Which blocks of a sliding-window group must cross the wire.

A sliding-window layer only ever reads the last ``window`` tokens, so the decoder needs just
the blocks that hold them; vLLM has already replaced older ones with the null block. The
window usually starts inside a block: that whole block is sent (it holds needed tokens) and
nothing before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


class WindowBlocks(NamedTuple):
    """``first`` is the logical index (in the request's block table) of ``block_ids[0]``, so
    the receiver puts them at the same logical positions of its own table."""

    first: int
    block_ids: list[int]


def window_block_range(num_tokens: int, window: int, block_size: int) -> range:
    """Logical block indices covering tokens ``[max(0, num_tokens - window), num_tokens)``."""
    if num_tokens < 0 or window <= 0 or block_size <= 0:
        raise ValueError(
            f"window_block_range: need num_tokens >= 0, window > 0, block_size > 0 "
            f"(got {num_tokens}, {window}, {block_size})"
        )
    if num_tokens == 0:
        return range(0, 0)
    first_token = max(0, num_tokens - window)
    return range(first_token // block_size, (num_tokens - 1) // block_size + 1)


def window_block_ids(block_ids: Sequence[int], num_tokens: int, window: int, block_size: int) -> WindowBlocks:
    """The physical ids (and first logical index) of the blocks covering the last ``window``
    tokens of a request with ``num_tokens`` tokens and block table ``block_ids``."""
    r = window_block_range(num_tokens, window, block_size)
    needed = (num_tokens + block_size - 1) // block_size
    if len(block_ids) < needed:
        raise ValueError(
            f"window_block_ids: {num_tokens} tokens need {needed} blocks of {block_size}, "
            f"block table has {len(block_ids)}"
        )
    return WindowBlocks(r.start, [int(b) for b in block_ids[r.start : r.stop]])
