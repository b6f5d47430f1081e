"""The router's small parts on their own: the per-engine PD strategies and the instance lease."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Gauge

from prfaas_plugin.protocol.requests import parse_params
from prfaas_plugin.router.instances import Instance
from prfaas_plugin.router.lease import Lease
from prfaas_plugin.router.pd import PROTOCOLS, SglangPD, VllmPD, pd_protocol


def _inst(role: str = "both", **kw: object) -> Instance:
    return Instance("http://10.0.0.1:8000", "local", "local", role, **kw)  # type: ignore[arg-type]


def _gauge() -> Gauge:
    return Gauge("queue", "q", ["cluster", "instance"], registry=CollectorRegistry())


def test_lease_counts_once_on_every_exit_path() -> None:
    inst, g = _inst(), _gauge()
    a, b = Lease(inst, g), Lease(inst, g)
    assert inst.inflight == 2
    a.release(served=True)
    a.release(served=True)  # a second release (an error path after the normal one) changes nothing
    assert (inst.inflight, inst.served) == (1, 1)
    with pytest.raises(RuntimeError), b:
        raise RuntimeError("upstream reset")
    assert inst.inflight == 0 and inst.served == 1
    assert g.labels("local", inst.url)._value.get() == 0


def test_vllm_strategy_builds_connector_bodies_towards_the_decoders_receiver() -> None:
    pd = pd_protocol("vllm", 12.0)
    assert isinstance(pd, VllmPD) and pd.needs_kv_endpoint and not pd.switches_roles
    prod, cons, tid = pd.bodies({"model": "m", "prompt": "x"}, _inst("prefill"), _inst("decode", kv_endpoint="d:1"))
    p = parse_params(prod["kv_transfer_params"])
    assert p is not None and p.decode_endpoint == "d:1" and p.deadline_s == 12.0 and p.transfer_id == tid
    with pytest.raises(ValueError, match="kv_endpoint"):
        pd.bodies({"model": "m"}, _inst("prefill"), _inst("decode"))
    assert not pd.decode_error_is_transfer_failure() and pd.decode_prefills_alone(_inst("decode"))


def test_sglang_strategy_pairs_by_bootstrap_room_and_needs_a_prefill_to_fall_back_on() -> None:
    pd = pd_protocol("sglang", 12.0)
    assert isinstance(pd, SglangPD) and pd.switches_roles and not pd.needs_kv_endpoint
    prod, cons, tid = pd.bodies({"model": "m"}, _inst("prefill", bootstrap_port=9000), _inst("decode"))
    assert prod["bootstrap_port"] == 9000 and tid == f"bootstrap_room={cons['bootstrap_room']}"
    assert pd.decode_error_is_transfer_failure()
    assert not pd.decode_prefills_alone(_inst("decode")) and pd.decode_prefills_alone(_inst("both"))


def test_an_unknown_engine_is_named_in_the_error() -> None:
    assert set(PROTOCOLS) == {"vllm", "sglang"}
    with pytest.raises(ValueError, match="'trtllm'"):
        pd_protocol("trtllm", 1.0)
