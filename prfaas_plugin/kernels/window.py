"""Which blocks of a sliding-window group must cross the wire.

This module is the one home of that rule, for both engines. ``window`` counts the tokens a
query attends to *including itself* (HF ``sliding_window``, vLLM ``SlidingWindowSpec.sliding_window``;
flash attention's ``window_size=(window - 1, 0)``). After a transfer of ``num_tokens`` tokens the
decoder's first step computes the token at position ``num_tokens``, which reads positions
``[num_tokens - window + 1, num_tokens]``; of those, ``[num_tokens - window + 1, num_tokens)`` are
in the cache and must cross the wire. That is exactly what the engines keep:

* vLLM's ``SlidingWindowManager.get_num_skipped_tokens(n) = n - sliding_window + 1``: blocks
  wholly before that token are already the null block on the decode side (and on a chunked
  prefill side), so sending them would write into the null block;
* SGLang keeps ``seq_len - sliding_window_size`` onwards, where its ``sliding_window_size`` is
  the HF window minus one (the query itself is not counted): the same first token.

The window usually starts inside a block: that whole block is sent (it holds needed tokens)
and nothing before it. (The rule NIXL uses, ``cdiv(window, block_size) + 1`` blocks back from
the end, sends one block more whenever the window does not start on the first token of a
block: a block the decoder has already nulled.)
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
    """Logical block indices covering tokens ``[max(0, num_tokens - window + 1), num_tokens)``:
    what the query at position ``num_tokens`` reads from the cache."""
    if num_tokens < 0 or window <= 0 or block_size <= 0:
        raise ValueError(
            f"window_block_range: need num_tokens >= 0, window > 0, block_size > 0 "
            f"(got {num_tokens}, {window}, {block_size})"
        )
    if num_tokens == 0:
        return range(0, 0)
    first_token = max(0, num_tokens - window + 1)
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
