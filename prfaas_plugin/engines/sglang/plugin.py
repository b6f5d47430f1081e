"""Registers ``--disaggregation-transfer-backend prfaas`` with SGLang, with no edit of SGLang.

SGLang calls :func:`register` through its ``sglang.srt.plugins`` entry point
(``sglang.srt.plugins.load_plugins()``, run early in every SGLang process). Importing this
module costs nothing: SGLang and our transport are imported inside ``register`` and inside the
``get_kv_class`` hook only.

SGLang 0.5.23 has no transfer-backend registry, so registration uses the three seams it does
expose (``sglang.md`` section 2):

1. ``add_disagg_transfer_backend_choices(["prfaas"])``: the public list that argparse validates
   ``--disaggregation-transfer-backend`` against (it is ``list.extend``: pass a list);
2. a ``PRFAAS = "prfaas"`` member added to the closed ``TransferBackend`` enum, since four
   call sites do ``TransferBackend(server_args.disaggregation_transfer_backend)``;
3. an AROUND hook on ``sglang.srt.disaggregation.utils.get_kv_class`` through SGLang's
   ``HookRegistry``, which also rebinds the name in modules that imported it already.

Seam 2 touches enum internals, so the plugin is written for exact SGLang versions and refuses
others (the flag then stays unknown to argparse) unless ``PRFAAS_ALLOW_UNTESTED_SGLANG=1``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from importlib import metadata
from typing import Any

logger = logging.getLogger(__name__)

BACKEND_NAME = "prfaas"
#: SGLang releases whose disaggregation interfaces this backend was written and tested against.
SUPPORTED_SGLANG_VERSIONS = frozenset({"0.5.23"})
ALLOW_UNTESTED_ENV = "PRFAAS_ALLOW_UNTESTED_SGLANG"

_GET_KV_CLASS = "sglang.srt.disaggregation.utils.get_kv_class"
_lock = threading.Lock()
_registered = False


class UnsupportedSGLangVersion(RuntimeError):
    """The installed SGLang is not one this backend was written for."""


def check_sglang_version(version: str | None, env: dict[str, str] | None = None) -> str:
    """Return ``version`` if supported; raise a message that says what to do otherwise."""
    env = dict(os.environ) if env is None else env
    if version is None:
        raise UnsupportedSGLangVersion(
            "prfaas SGLang backend: the `sglang` distribution is not installed "
            f"(supported: {', '.join(sorted(SUPPORTED_SGLANG_VERSIONS))})"
        )
    if version in SUPPORTED_SGLANG_VERSIONS:
        return version
    if env.get(ALLOW_UNTESTED_ENV) == "1":
        logger.warning(
            "prfaas SGLang backend: SGLang %s is untested (supported: %s); %s=1 is set, registering anyway",
            version,
            ", ".join(sorted(SUPPORTED_SGLANG_VERSIONS)),
            ALLOW_UNTESTED_ENV,
        )
        return version
    raise UnsupportedSGLangVersion(
        f"prfaas SGLang backend supports SGLang {', '.join(sorted(SUPPORTED_SGLANG_VERSIONS))}, "
        f"found {version}: `--disaggregation-transfer-backend {BACKEND_NAME}` is NOT registered. "
        f"Install a supported SGLang, or set {ALLOW_UNTESTED_ENV}=1 to try this one."
    )


def installed_sglang_version() -> str | None:
    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return None


def _add_enum_member(enum_cls: Any, name: str, value: str) -> Any:
    """Add ``name = value`` to a closed ``Enum`` in place, keeping the identity of existing
    members (SGLang compares ``backend == TransferBackend.MOONCAKE`` everywhere)."""
    existing = enum_cls._value2member_map_.get(value)
    if existing is not None:
        return existing
    member = object.__new__(enum_cls)
    member._name_ = name
    member._value_ = value
    member._sort_order_ = len(enum_cls._member_names_)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    type.__setattr__(enum_cls, name, member)
    return member


def _kv_class_hook(original: Callable[..., Any], transfer_backend: Any, class_type: Any) -> Any:
    """AROUND hook on ``get_kv_class``: our classes for ``prfaas``, SGLang's for the rest."""
    if getattr(transfer_backend, "value", transfer_backend) != BACKEND_NAME:
        return original(transfer_backend, class_type)
    from sglang.srt.disaggregation.utils import KVClassType

    if class_type == KVClassType.KVARGS:
        return original(transfer_backend, class_type)  # every backend shares SGLang's KVArgs
    from prfaas_plugin.engines.sglang import conn

    return {
        KVClassType.MANAGER: conn.PrfaasKVManager,
        KVClassType.SENDER: conn.PrfaasKVSender,
        KVClassType.RECEIVER: conn.PrfaasKVReceiver,
        KVClassType.BOOTSTRAP_SERVER: conn.PrfaasKVBootstrapServer,
    }.get(class_type)


def register() -> None:
    """Entry point called by SGLang's ``load_plugins()``. Idempotent; raises
    :class:`UnsupportedSGLangVersion` (which SGLang logs) on an SGLang it was not written for."""
    global _registered
    with _lock:
        if _registered:
            return
        check_sglang_version(installed_sglang_version())

        from sglang.srt.arg_groups.choices import (
            DISAGG_TRANSFER_BACKEND_CHOICES,
            add_disagg_transfer_backend_choices,
        )
        from sglang.srt.disaggregation.utils import TransferBackend
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType

        if BACKEND_NAME not in DISAGG_TRANSFER_BACKEND_CHOICES:
            add_disagg_transfer_backend_choices([BACKEND_NAME])
        _add_enum_member(TransferBackend, BACKEND_NAME.upper(), BACKEND_NAME)
        HookRegistry.register(_GET_KV_CLASS, _kv_class_hook, HookType.AROUND)
        _registered = True
        logger.info("prfaas: registered SGLang disaggregation transfer backend %r", BACKEND_NAME)
