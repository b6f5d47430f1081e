"""Settings of the ``prfaas`` SGLang transfer backend.

SGLang gives a transfer backend no config channel of its own (only ``--disaggregation-*``
flags meant for Mooncake/NIXL), so the backend reads ``PRFAAS_SGLANG_*`` environment variables,
validated here once, at manager start, with an error that names the variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from pydantic import ConfigDict, Field, ValidationError, field_validator

from prfaas_plugin.transfer.binding import ChannelSettings

ENV_PREFIX = "PRFAAS_SGLANG_"


class BackendConfig(ChannelSettings):
    """One SGLang rank's transfer settings; TLS (``PRFAAS_SGLANG_TLS_CERT`` / ``_KEY`` / ``_CA`` /
    ``_REQUIRE_CLIENT_CERT``) and integrity (``PRFAAS_SGLANG_CHECKSUMS``, comma-separated, and
    ``PRFAAS_SGLANG_ALLOW_UNVERIFIED_PLAINTEXT``) are :class:`ChannelSettings`, the same keys as
    the vLLM connector's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Decode: address the transfer receiver binds.
    listen_host: str = "0.0.0.0"
    #: Decode: first port; rank ``r`` binds ``listen_port + r``. 0 picks a free port per rank.
    listen_port: int = Field(0, ge=0, le=65535)
    #: Decode: first data-plane TCP port; rank ``r`` binds ``data_port + r``. 0: a free port.
    data_port: int = Field(0, ge=0, le=65535)
    #: Decode: host the prefill dials (a routable address across datacenters/NAT). Empty: the
    #: rank's own IP as SGLang detects it (``SGLANG_HOST_IP`` overrides that detection).
    advertise_host: str = ""
    #: Bytes per KV item on the wire: pages are grouped up to this size.
    item_bytes: int = Field(4 << 20, ge=4096)
    #: Whole-transfer deadline of one request, seconds.
    deadline_s: float = Field(120.0, gt=0)
    #: Prefill: TCP connections per decode peer (None: the transfer engine's default).
    connections: int | None = Field(None, ge=1, le=64)
    #: Prefill: egress budget in Gbit/s for this rank (None: unpaced).
    pacing_gbps: float | None = Field(None, gt=0)
    #: Pinned host staging per GPU (MiB) for KV on its way to or from the wire, allocated once
    #: at the first transfer; a full pool makes new transfers wait (kernels/device.py).
    staging_pool_mb: int = Field(4096, ge=1)
    #: Prefill: threads that gather pages and hand them to the transfer engine.
    workers: int = Field(2, ge=1, le=64)

    @field_validator("listen_host")
    @classmethod
    def _host_not_empty(cls, v: str) -> str:
        if not v:
            raise ValueError("must not be empty")
        return v

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BackendConfig:
        env = os.environ if env is None else env
        values: dict[str, Any] = {
            name: env[ENV_PREFIX + name.upper()] for name in cls.model_fields if ENV_PREFIX + name.upper() in env
        }
        unknown = sorted(
            k for k in env if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX) :].lower() not in cls.model_fields
        )
        if unknown:
            raise ValueError(
                f"unknown setting(s) {', '.join(unknown)}; known: "
                + ", ".join(ENV_PREFIX + n.upper() for n in cls.model_fields)
            )
        try:
            return cls(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            if not first["loc"]:  # a rule across settings (TLS pairs, integrity): name them as variables
                msg = re.sub(
                    r"\b(tls_\w+|checksums|allow_unverified_plaintext)\b",
                    lambda m: ENV_PREFIX + m.group(0).upper(),
                    first["msg"],
                )
                raise ValueError(msg.removeprefix("Value error, ")) from None
            name = ENV_PREFIX + str(first["loc"][0]).upper()
            raise ValueError(f"{name}={values.get(str(first['loc'][0]))!r}: {first['msg']}") from None
