"""The router's YAML config, validated at start: unknown keys, bad values and inconsistent
clusters are errors that name the field (see examples/router/clusters.yaml)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from prfaas_plugin.yamlconfig import load_yaml_model

#: Bytes of JSON one prompt token can take: a token id list spends up to 8 ("1234567,"), text
#: escaped as ``\uXXXX`` 6 per character and a token is often several characters.
BODY_BYTES_PER_TOKEN = 16


class RouterConfigError(ValueError):
    pass


class _Strict(BaseModel):
    # No router setting means anything as infinity or NaN (a threshold, a window, a timeout):
    # such a value is a typo that would only show later, as a 500 or a loop that never acts.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _check_url(v: str) -> str:
    if not (v.startswith("http://") or v.startswith("https://")):
        raise ValueError(f"instance url must start with http:// or https://, got {v!r}")
    try:
        parts = urlsplit(v)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number in range
    except ValueError as e:
        raise ValueError(f"instance url {v!r}: {e}") from None
    if not parts.hostname:
        raise ValueError(f"instance url {v!r} names no host")
    return v.rstrip("/")


def _check_zmq_endpoint(v: str) -> str:
    """A ZeroMQ endpoint the events subscriber can connect to: tcp://host:port or ipc://path."""
    scheme, sep, rest = v.partition("://")
    if not sep or scheme not in ("tcp", "ipc") or not rest:
        raise ValueError(f"kv_events must be tcp://host:port or ipc://path, got {v!r}")
    if scheme == "tcp":
        _check_hostport(rest)
    return v


def _check_hostport(v: str) -> str:
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be 'host:port', got {v!r}")
    return v


class InstanceSpec(_Strict):
    url: str
    #: The consumer's transfer receiver (``kv_connector_extra_config.listen`` of that instance),
    #: as the *producers* reach it. Required for instances that decode pushed KV.
    kv_endpoint: str | None = None
    #: vLLM KV-events publisher of this instance (``--kv-events-config`` endpoint), e.g.
    #: tcp://127.0.0.1:5557, feeding the prefix index.
    kv_events: str | None = None
    name: str | None = None
    #: SGLang prefill instances: their ``--disaggregation-bootstrap-port`` (decode instances
    #: reach the prefill's bootstrap server at the url's host and this port).
    bootstrap_port: int = Field(default=8998, gt=0, lt=65536)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _check_url(v)

    @field_validator("kv_events")
    @classmethod
    def _kv_events(cls, v: str | None) -> str | None:
        return None if v is None else _check_zmq_endpoint(v)

    @field_validator("kv_endpoint")
    @classmethod
    def _kv(cls, v: str | None) -> str | None:
        return None if v is None else _check_hostport(v)


class ClusterSpec(_Strict):
    name: str
    #: prfaas: remote prefill-only cluster; local: a PD cluster that can finish any request.
    kind: Literal["prfaas", "local"]
    prefill: list[InstanceSpec] = Field(default_factory=list)
    decode: list[InstanceSpec] = Field(default_factory=list)
    #: Instances that prefill and decode (a local cluster of one node, e.g. the CPU demo).
    both: list[InstanceSpec] = Field(default_factory=list)
    #: How this cluster's ``prefill`` instances hand KV to a decode instance (the protocol of that
    #: hop, chosen by the connector those instances run). ``prfaas``: the prfaas connector (the
    #: engine's protocol above). ``nixl``: vLLM's ``NixlConnector`` (engine vllm, local clusters
    #: only): the router then drives NIXL's own request protocol (router/pd.py, ``NixlPD``), and
    #: the decode instances run it next to the prfaas connector (docs/vllm.md, "Next to NIXL").
    transfer: Literal["prfaas", "nixl"] = "prfaas"

    @model_validator(mode="after")
    def _shape(self) -> ClusterSpec:
        if self.kind == "prfaas":
            if not self.prefill:
                raise ValueError(f"cluster {self.name!r}: a prfaas cluster needs prefill instances")
            if self.decode or self.both:
                raise ValueError(f"cluster {self.name!r}: a prfaas cluster has only prefill instances")
            if self.transfer != "prfaas":
                raise ValueError(
                    f"cluster {self.name!r}: transfer {self.transfer!r} is for the local hop; a prfaas cluster's "
                    "KV crosses datacenters on the prfaas connector (transfer: prfaas)"
                )
        else:
            if self.transfer != "prfaas" and not self.prefill:
                raise ValueError(
                    f"cluster {self.name!r}: transfer {self.transfer!r} sets how prefill instances hand KV on, "
                    "and this cluster has none (`both` instances hand nothing on)"
                )
            if not (self.both or (self.prefill and self.decode)):
                raise ValueError(
                    f"cluster {self.name!r}: a local cluster needs `both` instances, or prefill and decode instances"
                )
        return self


class ThresholdSpec(_Strict):
    mode: Literal["fixed", "auto"] = "fixed"
    #: Fixed threshold, or the starting point of ``auto``.
    tokens: float = Field(default=8192, ge=0)
    #: ``auto``: the planner YAML whose profiles, instance counts and link describe the clusters.
    planner: str | None = None
    #: Observed uncached lengths kept for re-optimisation, and how many are needed first.
    window: int = Field(default=512, ge=8)
    min_samples: int = Field(default=32, ge=1)
    reoptimize_every_s: float = Field(default=10.0, gt=0)
    #: Short-term loop: raise t when egress utilisation or the PrfaaS queue is above the high
    #: mark, relax back toward the planner's t when both are below the low marks (hysteresis).
    egress_high: float = Field(default=0.85, gt=0, le=1.5)
    egress_low: float = Field(default=0.6, gt=0, le=1.5)
    queue_high: int = Field(default=16, ge=1)
    queue_low: int = Field(default=4, ge=0)
    step: float = Field(default=0.15, gt=0, lt=1)
    #: Sliding window over which KV bytes make the egress estimate.
    egress_window_s: float = Field(default=10.0, gt=0)
    #: How often the router reads each PrfaaS producer's ``vllm:prfaas_kv_sent_bytes_total`` or
    #: ``sglang:prfaas_kv_sent_bytes_total`` (bytes its receivers confirmed) from /metrics for
    #: that estimate; 0 = never: use the bytes the producers report in their answers (a
    #: prediction for the whole prompt), else the estimate below (router/egress.py).
    egress_scrape_s: float = Field(default=2.0, ge=0)
    #: KV bytes one token puts on the link, for producers that neither expose a counter above nor
    #: report bytes in their answers (SGLang without ``--enable-metrics``, other connectors): their
    #: egress is estimated as this times the prompt beyond what the decode instance holds. Unset:
    #: the planner's PrfaaS profile (``auto``); with neither, such producers' egress shows as 0.
    kv_bytes_per_token: float | None = Field(default=None, gt=0)
    max_tokens: float = Field(default=1 << 20, gt=0)
    #: Long-term loop, SGLang only: flip local instances between prefill and decode toward the
    #: planner's split (``POST /pd_role_switch``; servers need ``--enable-pd-role-switch``), one
    #: at a time, each drained first, at most one per ``split_cooldown_s``.
    apply_split: bool = False
    split_cooldown_s: float = Field(default=300.0, gt=0)
    #: Give up a switch (and route to the instance again) if its open requests do not finish.
    drain_timeout_s: float = Field(default=120.0, gt=0)

    @model_validator(mode="after")
    def _auto(self) -> ThresholdSpec:
        if self.mode == "auto" and not self.planner:
            raise ValueError("threshold.mode auto needs threshold.planner (a planner YAML)")
        if self.egress_low >= self.egress_high:
            raise ValueError("threshold.egress_low must be below egress_high")
        if self.queue_low >= self.queue_high:
            raise ValueError("threshold.queue_low must be below queue_high")
        if self.tokens > self.max_tokens:
            raise ValueError(
                f"threshold.tokens ({self.tokens:g}) must not exceed threshold.max_tokens ({self.max_tokens:g})"
            )
        if self.apply_split and self.mode != "auto":
            raise ValueError("threshold.apply_split needs threshold.mode auto (the split comes from the planner)")
        return self


class TimeoutSpec(_Strict):
    connect_s: float = Field(default=3.0, gt=0)
    prefill_s: float = Field(default=120.0, gt=0)
    request_s: float = Field(default=600.0, gt=0)
    #: How long an idle pooled connection to an instance is kept. Must stay *below* the
    #: instances' own keep-alive (uvicorn, hence vLLM and SGLang: 5 s), or the router reuses a
    #: connection the instance is closing and the request fails with "Server disconnected".
    keepalive_s: float = Field(default=4.0, gt=0)
    health_every_s: float = Field(default=5.0, gt=0)
    #: How often an instance marked down is probed (by a probe, or by a request it refused): a
    #: restarted engine or a PrfaaS cluster back from a blip takes traffic again within this,
    #: not a whole ``health_every_s`` later (meanwhile long requests stay local). Never less
    #: often than ``health_every_s``.
    health_down_every_s: float = Field(default=1.0, gt=0)
    #: A /health probe's own limit. An engine busy with a long prefill on few cores can answer
    #: late; that is not the same as down.
    health_timeout_s: float = Field(default=5.0, gt=0)
    #: Consecutive *slow* probes (timeouts, resets) before an instance is marked unhealthy. A
    #: refused connection or a non-200 answer marks it at once: those are not ambiguous.
    health_failures: int = Field(default=3, ge=1)


class GcSpec(_Strict):
    """Cyclic garbage collection on a clock (router/gcpace.py says why)."""

    #: Young-generation collection period; 0 leaves CPython's allocation-count trigger alone.
    young_every_ms: float = Field(default=10.0, ge=0)
    #: A middle-generation collection every this many young ones.
    middle_every: int = Field(default=3, ge=1)
    #: Whole-heap collection period.
    full_every_s: float = Field(default=60.0, gt=0)
    #: Period while no completion request is open (the first one to arrive wakes the pacer).
    idle_every_s: float = Field(default=1.0, gt=0)


class KeySource(_Strict):
    """Where API keys come from; the keys of all three sources are accepted (router/auth.py reads
    them at start, so a rotated file or variable takes effect on restart)."""

    #: Keys written in the config itself.
    keys: list[str] = Field(default_factory=list)
    #: A file with one key per line (blank lines and lines starting with ``#`` are skipped);
    #: relative to the config file.
    file: str | None = None
    #: An environment variable holding one key, or several separated by commas.
    env: str | None = None

    @property
    def configured(self) -> bool:
        return bool(self.keys or self.file or self.env)


class AuthSpec(_Strict):
    """Who may use the router (docs/router.md, "Authentication").

    ``api_keys`` unset: the OpenAI endpoints are open, as vLLM's are without ``--api-key``.
    ``admin_keys`` unset: ``/admin/*`` answers loopback clients only."""

    #: Keys clients send as ``Authorization: Bearer <key>`` on the OpenAI endpoints.
    api_keys: KeySource = KeySource()
    #: Keys for ``/admin/*`` (they work on the OpenAI endpoints too); a user key there gets 403.
    admin_keys: KeySource = KeySource()
    #: Also require a key (user or admin) on ``/health`` and ``/metrics``.
    protect_health: bool = False
    protect_metrics: bool = False
    #: The key the router sends the engines (their ``--api-key``); exactly one key.
    upstream_api_key: KeySource = KeySource()

    @model_validator(mode="after")
    def _protect(self) -> AuthSpec:
        if (self.protect_health or self.protect_metrics) and not (
            self.api_keys.configured or self.admin_keys.configured
        ):
            raise ValueError("auth.protect_health/protect_metrics need auth.api_keys or auth.admin_keys")
        return self


class ReplicaSpec(_Strict):
    """Running several router replicas behind one Service (docs/router-replicas.md)."""

    @field_validator("peers")
    @classmethod
    def _peers(cls, v: list[str]) -> list[str]:
        return [_check_url(u) for u in v]

    @field_validator("peers_dns")
    @classmethod
    def _peers_dns(cls, v: str | None) -> str | None:
        return None if v is None else _check_hostport(v)

    #: Where the prefix index comes from. ``both``: the instances' KV events (``kv_events``) and
    #: this replica's own record of what it routed; ``events``: the KV events alone, so every
    #: replica holds the same index (instances without ``kv_events`` then show no prefixes);
    #: ``own``: this replica's record alone (one router, or the contrast in the tests).
    prefix_source: Literal["both", "events", "own"] = "both"
    #: How often each instance's running + waiting requests are read from its /metrics (vLLM's
    #: ``vllm:num_requests_running``/``_waiting``, SGLang's ``sglang:num_running_reqs``/
    #: ``num_queue_reqs``); placement and the PrfaaS queue then count the whole fleet's requests,
    #: not only this replica's. 0: never (this replica's own open requests alone).
    load_scrape_s: float = Field(default=0.0, ge=0)
    #: A reading older than this is ignored (the instance counts its own open requests only).
    load_stale_s: float = Field(default=10.0, gt=0)
    #: The other replicas, whose recent uncached lengths join this replica's own in the planner's
    #: re-optimisation of t* (router/peers.py says why): base URLs (``http://10.0.0.7:8000``),
    #: and/or ``peers_dns``: a ``host:port`` whose every address is a replica (a Kubernetes
    #: headless Service), resolved each round. A replica finds itself among them and skips it.
    peers: list[str] = Field(default_factory=list)
    peers_dns: str | None = None
    #: How often the peers' lengths are read (and how old a peer's copy may get before it is dropped: 3x).
    peers_every_s: float = Field(default=5.0, gt=0)
    #: SIGTERM: stop accepting, let open requests finish for up to this long, then cut them
    #: (their upstream requests are closed, so the engines abort them) and exit.
    drain_grace_s: float = Field(default=30.0, ge=0)


class RouterConfig(_Strict):
    #: Model name served on /v1/models (requests naming another model get a 404).
    model: str = Field(min_length=1)
    #: The engine every instance runs. vllm: the prfaas connector's request protocol
    #: (kv_transfer_params, docs/protocol.md). sglang: SGLang's PD protocol (bootstrap_host /
    #: bootstrap_port / bootstrap_room injected into both requests, as its own routers do),
    #: with ``--disaggregation-transfer-backend prfaas`` on the instances.
    engine: Literal["vllm", "sglang"] = "vllm"
    #: Folder with the model's tokenizer (tokenizer.json/tokenizer_config.json); offline.
    tokenizer: str
    #: Prefix-index granularity in tokens (the engines' KV block size).
    block_size: int = Field(default=16, ge=1)
    link_gbps: float = Field(default=100.0, gt=0)
    bandwidth_mode: Literal["auto", "scarce", "abundant"] = "auto"
    #: transfer deadline the router asks for (kv_transfer_params.deadline_s)
    transfer_deadline_s: float = Field(default=60.0, gt=0)
    max_prompt_tokens: int = Field(default=1 << 20, gt=0)
    #: Largest request body accepted (larger ones get 413 before they are parsed). Unset:
    #: ``BODY_BYTES_PER_TOKEN`` per ``max_prompt_tokens`` plus 1 MiB for the other fields.
    max_body_bytes: int | None = Field(default=None, gt=0)
    auth: AuthSpec = AuthSpec()
    threshold: ThresholdSpec = ThresholdSpec()
    timeouts: TimeoutSpec = TimeoutSpec()
    gc: GcSpec = GcSpec()
    replicas: ReplicaSpec = ReplicaSpec()
    clusters: list[ClusterSpec] = Field(min_length=1)

    @property
    def body_limit(self) -> int:
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return self.max_prompt_tokens * BODY_BYTES_PER_TOKEN + (1 << 20)

    @model_validator(mode="after")
    def _clusters(self) -> RouterConfig:
        names = [c.name for c in self.clusters]
        if len(set(names)) != len(names):
            raise ValueError(f"cluster names must be unique, got {names}")
        if not any(c.kind == "local" for c in self.clusters):
            raise ValueError("at least one local cluster is needed (it decodes every request)")
        urls = [i.url for c in self.clusters for i in c.prefill + c.decode + c.both]
        if len(set(urls)) != len(urls):
            raise ValueError("an instance url appears twice")
        from prfaas_plugin.router.pd import PROTOCOLS  # pd.py imports instances.py, which imports this

        pd = PROTOCOLS[self.engine]
        if self.threshold.apply_split and not pd.switches_roles:
            raise ValueError(
                f"threshold.apply_split needs engine: {' or '.join(e for e, p in PROTOCOLS.items() if p.switches_roles)}"
                f" ({self.engine} instances cannot switch roles at run time)"
            )
        from prfaas_plugin.router.pd import HOP_TRANSFERS

        for c in self.clusters:
            if c.transfer != "prfaas" and self.engine not in HOP_TRANSFERS[c.transfer][1]:
                raise ValueError(
                    f"cluster {c.name!r}: transfer {c.transfer!r} needs engine: "
                    f"{' or '.join(HOP_TRANSFERS[c.transfer][1])}; with engine {self.engine} the backend of each "
                    "hop is chosen on the servers and the router's protocol is the same for all (docs/sglang.md)"
                )
        # The prfaas connector's consumers are reached at their kv_endpoint; a fleet whose every
        # hand-off goes over another protocol (all its prefill instances on NIXL) needs none.
        other_wire_only = any(c.transfer != "prfaas" for c in self.clusters) and all(
            c.transfer != "prfaas" for c in self.clusters if c.prefill
        )
        if pd.needs_kv_endpoint and not other_wire_only:
            for c in self.clusters:
                for inst in c.decode + c.both:
                    if inst.kv_endpoint is None:
                        raise ValueError(
                            f"cluster {c.name!r}: decoding instance {inst.url} needs kv_endpoint "
                            f"(its prfaas transfer receiver)"
                        )
        r = self.replicas
        remote_peers = [u for u in r.peers if not is_loopback_host(urlsplit(u).hostname or "")]
        if (remote_peers or r.peers_dns) and not self.auth.admin_keys.configured:
            raise ValueError(
                "replicas.peers/peers_dns on other hosts need auth.admin_keys: replicas read each other's "
                "/admin/lengths, which answers loopback clients only without admin keys"
            )
        return self


def is_loopback_host(host: str) -> bool:
    """``host`` (an address, or ``localhost``) is this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_router_config(path: str | Path) -> RouterConfig:
    cfg = load_yaml_model(path, RouterConfig, "router config", RouterConfigError)
    base = Path(path).parent
    # Relative paths are relative to the config file.
    if not Path(cfg.tokenizer).is_absolute():
        cfg.tokenizer = str((base / cfg.tokenizer).resolve())
    for src in (cfg.auth.api_keys, cfg.auth.admin_keys, cfg.auth.upstream_api_key):
        if src.file and not Path(src.file).is_absolute():
            src.file = str((base / src.file).resolve())
    if cfg.threshold.planner and not Path(cfg.threshold.planner).is_absolute():
        cfg.threshold.planner = str((base / cfg.threshold.planner).resolve())
    return cfg
