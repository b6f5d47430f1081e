"""Registration and request-parameter checks of the vLLM connector (no server needed, vllm imported)."""

from __future__ import annotations

import importlib.metadata as md

import pytest
from vllm_helpers import requires_vllm

from prfaas_plugin.protocol import metrics as M

pytestmark = [pytest.mark.vllm, requires_vllm]


def test_entry_point_declared_and_registers_both_names_idempotently():
    eps = [e for e in md.entry_points(group="vllm.general_plugins") if e.name == "prfaas"]
    assert eps, "the installed prfaas-plugin declares no vllm.general_plugins entry point 'prfaas'"
    register = eps[0].load()
    register()
    register()  # vLLM loads plugins more than once per process
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import SupportsHMA

    for name in ("prfaas", "PrfaaSConnector"):
        cls = KVConnectorFactory.get_connector_class(KVTransferConfig(kv_connector=name, kv_role="kv_producer"))
        assert cls.__name__ == "PrfaaSConnector" and issubclass(cls, SupportsHMA)


def test_module_path_resolves_both_names():
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    for name in ("prfaas", "PrfaaSConnector"):
        cfg = KVTransferConfig(
            kv_connector=name, kv_role="kv_consumer", kv_connector_module_path="prfaas_plugin.engines.vllm.connector"
        )
        assert KVConnectorFactory.get_connector_class(cfg).__name__ == "PrfaaSConnector"


@pytest.mark.parametrize(
    "raw,needle",
    [
        ({"prfaas_version": 2, "role": "consumer", "transfer_id": "a", "token": "b" * 16}, "prfaas_version"),
        ({"prfaas_version": 1, "role": "x", "transfer_id": "a", "token": "b" * 16}, "role"),
        ({"prfaas_version": 1, "role": "consumer", "token": "b" * 16}, "transfer_id"),
        ({"prfaas_version": 1, "role": "consumer", "transfer_id": "a", "token": "b" * 15}, "token"),
        ({"prfaas_version": 1, "role": "producer", "transfer_id": "a", "token": "b" * 16}, "decode_endpoint"),
        (
            {"prfaas_version": 1, "role": "consumer", "transfer_id": "a", "token": "b" * 16, "deadline_s": -1},
            "deadline_s",
        ),
    ],
)
def test_bad_params_name_the_field(raw, needle):
    from prfaas_plugin.protocol.requests import BadParams
    from prfaas_plugin.protocol.requests import parse_params as parse

    with pytest.raises(BadParams, match=needle):
        parse(raw)


def test_non_prfaas_params_are_plain_requests():
    from prfaas_plugin.protocol.requests import parse_params as parse

    assert parse(None) is None and parse({"do_remote_prefill": True}) is None


def test_options_refuse_unknown_keys_and_bad_listen():
    from pydantic import ValidationError

    from prfaas_plugin.engines.vllm.options import Options

    assert Options.from_extra(None).kv_load_failure_policy == "recompute"
    with pytest.raises(ValidationError):
        Options.from_extra({"lisen": "x:1"})
    with pytest.raises(ValidationError, match="listen"):
        Options.from_extra({"listen": "nohost"})


def test_pack_unpack_round_trip_both_block_dims():
    import torch

    from prfaas_plugin.engines.vllm import packing

    packer = packing.Packer()
    for bdim, shape in ((0, (10, 2, 16, 8)), (1, (2, 10, 16, 8))):
        src = torch.randn(shape).to(torch.bfloat16)
        dst = torch.zeros_like(src)
        buf = packer.pack(src, bdim, [7, 2, 5])
        assert buf.is_contiguous() and buf.numel() * 2 == 3 * packing.block_bytes(src, bdim)
        assert packer.unpack(dst, bdim, [1, 3, 4], buf.view(torch.uint8).flatten(), skip_before=1).ready()
        assert torch.equal(dst.select(bdim, 3), src.select(bdim, 2))
        assert torch.equal(dst.select(bdim, 4), src.select(bdim, 5))
        assert not dst.select(bdim, 1).any(), "skipped (locally cached) block was overwritten"


def test_layout_fingerprint_mismatch_names_the_difference():
    from prfaas_plugin.engines.vllm.layout import GroupInfo, block_range, fingerprint

    g = GroupInfo(0, "full", 16, 0, ("l0",), 1024)
    a = fingerprint([g], {"l0": [("torch.bfloat16", (2, 16, 64))]}, 0, 1, "m", "auto")
    b = fingerprint([g], {"l0": [("torch.bfloat16", (2, 16, 64))]}, 0, 2, "m", "auto")
    assert a.diff(b) == ["tp_size: 1 != 2"]
    swa = GroupInfo(1, "swa", 16, 64, ("l1",), 1024)
    assert block_range(swa, 200, 13) == (13 - 5, 13)  # tokens 137..199: blocks 8..12, the tail only
    assert block_range(swa, 208, 13) == (9, 13)  # tokens 145..207: 4 blocks (NIXL's cdiv(64, 16) + 1 = 5)
    assert block_range(GroupInfo(2, "state", 16, 0, ("l2",), 9), 200, 1) == (0, 1)


@requires_vllm
def test_recurrent_state_order_is_part_of_the_fingerprint(monkeypatch):
    """vLLM registers a GDN/Mamba page as bytes, so its shape is the same whichever way the conv
    state inside is ordered: two instances that order it differently (SD by default, DS where NIXL
    is configured) must be refused at the handshake, naming the setting to align, instead of the
    decode reading a scrambled state and answering wrong (the hybrid NIXL + prfaas defect)."""
    from vllm import envs
    from vllm.model_executor.layers.mamba.mamba_utils import get_conv_state_layout

    from prfaas_plugin.engines.vllm.layout import CONV_LAYOUT_FIELD, GroupInfo, fingerprint

    envs.disable_envs_cache()  # read the variable as a starting engine does (vLLM caches it once serving)
    state = GroupInfo(0, "state", 640, 0, ("l0",), 4096, ("torch.bfloat16", "torch.float32"))
    full = GroupInfo(1, "full", 640, 0, ("l1",), 4096)
    parts = {"l0": [("torch.int8", (1, 1, 5120))], "l1": [("torch.bfloat16", (2, 640, 64))]}
    fps = {}
    for order in ("SD", "DS", None):
        if order is None:
            monkeypatch.delenv(CONV_LAYOUT_FIELD, raising=False)
        else:
            monkeypatch.setenv(CONV_LAYOUT_FIELD, order)
        get_conv_state_layout.cache_clear()  # vLLM reads it once per process
        fps[order] = fingerprint([state, full], parts, 0, 1, "m", "auto")
    assert fps["SD"].diff(fps["DS"]) == [f"{CONV_LAYOUT_FIELD}: 'SD' != 'DS'"]
    assert fps[None].fields[CONV_LAYOUT_FIELD] == "SD"  # vLLM's default where nothing chose DS
    assert fps["SD"].fields["group0"]["state_dtypes"] == ["torch.bfloat16", "torch.float32"]
    # attention-only models carry no conv state: the setting does not concern them
    assert CONV_LAYOUT_FIELD not in fingerprint([full], {"l1": parts["l1"]}, 0, 1, "m", "auto").fields
    get_conv_state_layout.cache_clear()


@requires_vllm
def test_swa_blocks_sent_are_the_blocks_vllms_swa_manager_keeps():
    """The decoder's first query (position n, after a transfer of n tokens) reads tokens
    [n - window + 1, n); vLLM's SlidingWindowManager nulls every block before token
    ``get_num_skipped_tokens(n)``, on the decode side for the loaded prefix and on a chunked
    prefill side. The blocks we send must be exactly the ones it keeps: one fewer would lose
    attended tokens, one more (the old ``cdiv(w, bs) + 1`` rule at 208 tokens, window 64,
    block 16: 5 blocks instead of 4) lands in the decoder's null block."""
    from types import SimpleNamespace

    from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager

    from prfaas_plugin.engines.vllm.layout import GroupInfo, block_range, cdiv

    for window in (1, 5, 16, 64, 100):
        for bs in (1, 4, 16):
            swa = GroupInfo(0, "swa", bs, window, ("l",), 64)
            mgr = SimpleNamespace(sliding_window=window, extra_retained_tokens=0)
            for n in range(0, 300, 7):
                kept_from = SlidingWindowManager.get_num_skipped_tokens(mgr, n) // bs  # type: ignore[arg-type]
                held = cdiv(n, bs)
                assert block_range(swa, n, held) == (min(kept_from, held), held), (window, bs, n)


@requires_vllm
def test_connector_stats_survive_vllms_round_trip_and_feed_prometheus():
    """Stats travel worker -> scheduler -> API server as plain data and are rebuilt there by the
    connector class; the rebuilt object must aggregate, reduce and feed the vllm:prfaas_* series."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from prfaas_plugin.engines.vllm.connector import PrfaaSConnector

    worker = PrfaaSConnector.build_kv_connector_stats()
    assert worker.is_empty()
    worker.record_load(1000, 0.02)
    worker.record_load_failure("TransferTimeout")
    worker.record_sent(3000)
    sent = worker.clone_and_reset()
    assert worker.is_empty() and not sent.is_empty()

    other = PrfaaSConnector.build_kv_connector_stats()
    other.record_load(500, 0.04)
    merged = PrfaaSConnector.build_kv_connector_stats(dict(sent.to_dict())).aggregate(other)
    summary = merged.reduce()
    assert summary["KV loads"] == 2 and summary["Load failures (recomputed)"] == 1
    assert summary["Load failures: TransferTimeout"] == 1 and summary["Avg load time (ms)"] == 30.0

    reg = CollectorRegistry()

    def bound(cls):
        class Bound(cls):
            def __init__(self, *a, **kw):
                super().__init__(*a, registry=reg, **kw)

        return Bound

    class _Cfg:
        kv_transfer_config = None

    prom = PrfaaSConnector.build_prom_metrics(
        _Cfg(),
        {Counter: bound(Counter), Gauge: bound(Gauge), Histogram: bound(Histogram)},
        ["model_name", "engine"],
        {0: ["m", "0"]},
    )
    prom.observe(merged.to_dict(), 0)
    value = lambda n: reg.get_sample_value(n, {"model_name": "m", "engine": "0"})  # noqa: E731
    assert value(M.VLLM_KV_RECEIVED_BYTES.exposed) == 1500
    assert value(M.VLLM_KV_LOADS.exposed) == 2
    assert value(M.VLLM_KV_LOAD_FAILURES.exposed) == 1
    assert value(M.VLLM_KV_SENT_BYTES.exposed) == 3000
    assert value(M.VLLM_KV_LOAD_SECONDS.name + "_count") == 2


@pytest.mark.parametrize("version", ["0.31.2", "0.35.0", "0.35.0.dev12+gabc", "1.0.0"])
def test_unsupported_vllm_logs_one_line_when_vllm_loads_the_plugin(version):
    """Through vLLM's own loader, in a fresh interpreter whose vLLM reports ``version``: one error
    line naming the supported range, the connector not registered, vLLM itself not stopped."""
    import subprocess
    import sys

    code = (
        f"import vllm.version as v; v.__version__ = {version!r}\n"
        "from vllm.plugins import load_general_plugins; load_general_plugins()\n"
        "from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory as F\n"
        "print('REGISTERED' if 'prfaas' in F._registry else 'NOT-REGISTERED')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("NOT-REGISTERED"), r.stdout
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if "prfaas-plugin" in ln]
    assert len(lines) == 1 and "vllm>=0.32,<0.35" in lines[0] and f"vLLM {version} is installed" in lines[0], lines


@pytest.mark.parametrize("version,ok", [("0.32.0", True), ("0.33.1", True), ("0.34.0rc1", True), ("0.31.9", False)])
def test_supported_range_boundaries(version, ok):
    from prfaas_plugin.engines.vllm import compat

    assert (compat.unsupported_reason(version) is None) is ok


def test_connector_module_refuses_an_unsupported_vllm(monkeypatch):
    """``kv_connector_module_path`` bypasses the plugin: the module import itself says why."""
    import importlib
    import sys

    from prfaas_plugin.engines.vllm import compat

    monkeypatch.setattr(compat, "vllm_version", lambda: "0.31.0")
    monkeypatch.delitem(sys.modules, "prfaas_plugin.engines.vllm.connector", raising=False)
    with pytest.raises(compat.UnsupportedVLLM, match=r"supports vllm>=0.32,<0.35 but vLLM 0.31.0"):
        importlib.import_module("prfaas_plugin.engines.vllm.connector")
    monkeypatch.undo()
    sys.modules.pop("prfaas_plugin.engines.vllm.connector", None)
    importlib.import_module("prfaas_plugin.engines.vllm.connector")
