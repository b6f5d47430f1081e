"""The SGLang backend's parts that need no SGLang: page/state addressing over raw pointers,
item planning and naming, control messages, settings, and the plugin's version gate."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from prfaas_plugin.engines.sglang import plugin
from prfaas_plugin.engines.sglang.config import BackendConfig
from prfaas_plugin.engines.sglang.memory import (
    AddressError,
    HostSpace,
    Region,
    consecutive_start,
    space_for,
)
from prfaas_plugin.engines.sglang.wire import (
    Layout,
    Metadata,
    Registration,
    WireError,
    group_pages,
    parse_item_name,
    plan_items,
)


def _region(buf: np.ndarray, name: str = "kv") -> Region:
    return Region(buf.ctypes.data, buf.nbytes, buf.shape[1], name)


# -- memory ------------------------------------------------------------------------------------
def test_page_address_is_ptr_plus_index_times_item_len() -> None:
    pool = np.arange(10 * 6, dtype=np.uint8).reshape(10, 6)
    got = HostSpace().gather(_region(pool), [7, 2, 9])
    np.testing.assert_array_equal(np.asarray(got), pool[[7, 2, 9]])


def test_consecutive_pages_are_sent_in_place() -> None:
    pool = np.zeros((8, 4), dtype=np.uint8)
    view = HostSpace().gather(_region(pool), [3, 4, 5])
    pool[4, 0] = 99  # zero-copy: the view sees the pool
    assert np.asarray(view)[1, 0] == 99


def test_landing_in_place_for_runs_and_scatter_otherwise() -> None:
    space = HostSpace()
    pool = np.zeros((8, 4), dtype=np.uint8)
    reg = _region(pool)
    view, in_place = space.landing(reg, np.array([2, 3]))
    assert in_place
    view[:] = bytes(range(1, 9))
    np.testing.assert_array_equal(pool[2:4].reshape(-1), np.arange(1, 9))
    view, in_place = space.landing(reg, np.array([6, 0]))
    assert not in_place and view.nbytes == 8
    view[:] = bytes([7] * 4 + [5] * 4)
    assert not pool[6].any()  # nothing lands before scatter
    space.scatter(reg, np.array([6, 0]), view)
    assert (pool[6] == 7).all() and (pool[0] == 5).all()


@pytest.mark.parametrize("bad", [[-1], [8], [0, 100]])
def test_out_of_range_index_raises_before_touching_memory(bad: list[int]) -> None:
    pool = np.zeros((8, 4), dtype=np.uint8)
    space = HostSpace()
    with pytest.raises(AddressError, match="outside"):
        space.gather(_region(pool), bad)
    with pytest.raises(AddressError, match="outside"):
        space.landing(_region(pool), np.array(bad))
    with pytest.raises(AddressError, match="outside"):
        space.scatter(_region(pool), np.array(bad), memoryview(bytes(4 * len(bad))))
    assert not pool.any()


def test_scatter_size_mismatch_and_bad_regions() -> None:
    pool = np.zeros((4, 4), dtype=np.uint8)
    with pytest.raises(AddressError, match="bytes for"):
        HostSpace().scatter(_region(pool), np.array([1]), memoryview(bytes(3)))
    with pytest.raises(AddressError, match="item_len"):
        Region(pool.ctypes.data, 16, 0)
    with pytest.raises(AddressError, match="null pointer"):
        Region(0, 16, 4)
    # A length that is not a whole number of items: the tail is not addressable.
    assert Region(pool.ctypes.data, 15, 4).capacity == 3


def test_state_slots_have_their_own_item_len() -> None:
    conv = np.arange(5 * 3, dtype=np.uint8).reshape(5, 3)
    temporal = np.arange(5 * 11, dtype=np.uint8).reshape(5, 11)
    space = HostSpace()
    assert np.asarray(space.gather(_region(conv), [4])).nbytes == 3
    np.testing.assert_array_equal(np.asarray(space.gather(_region(temporal), [4])), temporal[[4]])


def test_consecutive_start() -> None:
    assert consecutive_start(np.array([4, 5, 6])) == 4
    assert consecutive_start(np.array([4])) == 4
    assert consecutive_start(np.array([4, 6, 5])) is None
    assert consecutive_start(np.array([], dtype=np.int64)) is None


def test_space_for_devices() -> None:
    assert isinstance(space_for("cpu"), HostSpace)
    with pytest.raises(AddressError, match="not supported"):
        space_for("npu")


# -- wire ----------------------------------------------------------------------------------------
LAYOUT = Layout(
    page_size=16,
    kv_cache_dtype="bfloat16",
    kv_item_lens=(1000, 1000, 500),
    aux_item_lens=(8, 16),
    state_types=("mamba", "swa"),
    state_item_lens=((40, 400), (64,)),
    attn_tp_size=2,
    is_mla=False,
)


def test_plan_covers_every_byte_once() -> None:
    group = group_pages(10, LAYOUT.kv_item_lens, 4000)
    assert group == 4
    items = plan_items(LAYOUT, 10, [1, 3], group)
    names = [i.name for i in items]
    assert len(set(names)) == len(names)
    kv = [parse_item_name(i.name) for i in items if i.name.startswith("kv.")]
    for b, item_len in enumerate(LAYOUT.kv_item_lens):
        covered = sorted(p for r in kv if r.a == b for p in range(r.b, r.b + r.count))
        assert covered == list(range(10))
    total = sum(i.nbytes for i in items)
    assert total == 10 * 2500 + 1 * 440 + 3 * 64 + 24
    # Production order: page groups first, then state, then aux last.
    orders = [i.order for i in items]
    assert orders == sorted(orders)
    assert items[-1].name.startswith("aux.")


def test_plan_skips_absent_state_and_rejects_bad_counts() -> None:
    items = plan_items(LAYOUT, 0, [None, 0], 1)
    assert [i.name for i in items] == ["aux.0", "aux.1"]
    with pytest.raises(WireError, match="components"):
        plan_items(LAYOUT, 3, [1], 1)


def test_item_names_round_trip_and_garbage_is_refused() -> None:
    r = parse_item_name("kv.3.128.64")
    assert (r.kind, r.a, r.b, r.count) == ("kv", 3, 128, 64)
    assert parse_item_name("st.1.0").kind == "st"
    assert parse_item_name("aux.2").a == 2
    for bad in ["kv.1.2", "st.a.0", "aux", "../etc", "kv.-1.0.1"]:
        with pytest.raises(WireError):
            parse_item_name(bad)


def test_fingerprint_names_what_differs_and_ignores_tp_for_mla() -> None:
    other = Layout(**{**LAYOUT.__dict__, "kv_item_lens": (1000, 1000, 501)})
    assert LAYOUT.fingerprint().diff(other.fingerprint()) == ["kv_item_lens: [1000, 1000, 500] != [1000, 1000, 501]"]
    mla_a = Layout(**{**LAYOUT.__dict__, "is_mla": True, "attn_tp_size": 2})
    mla_b = Layout(**{**LAYOUT.__dict__, "is_mla": True, "attn_tp_size": 8})
    assert mla_a.fingerprint().diff(mla_b.fingerprint()) == []
    mha_b = Layout(**{**LAYOUT.__dict__, "attn_tp_size": 8})
    assert LAYOUT.fingerprint().diff(mha_b.fingerprint()) == ["attn_tp_size: 2 != 8"]


def test_control_messages_round_trip() -> None:
    reg = Registration("10.0.0.2:5000", "10.0.0.2:15600", LAYOUT, 3)
    assert Registration.from_frames(reg.to_frames()) == reg
    meta = Metadata(
        room=2**62,
        decode_key="10.0.0.2:5000",
        required_dst_info_num=1,
        is_dummy=False,
        session_id="s",
        token="t",
        aux_index=7,
        decode_prefix_len=32,
        kv_indices=np.array([5, 1, 9], np.int32),
        state_indices=(np.array([2], np.int32), None),
    )
    back = Metadata.from_frames(meta.to_frames())
    assert back.room == meta.room and back.aux_index == 7 and back.decode_prefix_len == 32
    np.testing.assert_array_equal(back.kv_indices, meta.kv_indices)
    assert back.state_indices[1] is None
    np.testing.assert_array_equal(back.state_indices[0], [2])


@pytest.mark.parametrize(
    "frames",
    [
        [b"PRFAAS_META"],
        [b"PRFAAS_META", b"not json", b""],
        [b"PRFAAS_META", b"[1]", b""],
        [b"PRFAAS_META", b'{"room": 1}', b""],
        [b"OTHER", b"{}", b""],
    ],
)
def test_malformed_metadata_is_a_wire_error(frames: list[bytes]) -> None:
    with pytest.raises(WireError):
        Metadata.from_frames(frames)


def test_metadata_frame_count_must_match_state_lists() -> None:
    frames = Metadata(1, "k", 1, False, state_indices=(np.array([1], np.int32),)).to_frames()
    with pytest.raises(WireError, match="frames"):
        Metadata.from_frames(frames[:-1])


def test_registration_with_broken_layout_is_refused() -> None:
    frames = Registration("a:1", "a:2", LAYOUT, 0).to_frames()
    frames[1] = frames[1].replace(b'"page_size": 16', b'"page_size": "x"')
    with pytest.raises(WireError, match="layout"):
        Registration.from_frames(frames)


# -- config ----------------------------------------------------------------------------------
def test_config_from_env() -> None:
    cfg = BackendConfig.from_env({"PRFAAS_SGLANG_LISTEN_PORT": "15600", "PRFAAS_SGLANG_ADVERTISE_HOST": "dc2.example"})
    assert cfg.listen_port == 15600 and cfg.advertise_host == "dc2.example"
    assert BackendConfig.from_env({}).item_bytes == 4 << 20


@pytest.mark.parametrize(
    "env, match",
    [
        ({"PRFAAS_SGLANG_LISTEN_PORT": "70000"}, "PRFAAS_SGLANG_LISTEN_PORT='70000'"),
        ({"PRFAAS_SGLANG_DEADLINE_S": "-1"}, "PRFAAS_SGLANG_DEADLINE_S"),
        ({"PRFAAS_SGLANG_LISTEN_PROT": "1"}, "unknown setting"),
    ],
)
def test_config_errors_name_the_variable(env: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BackendConfig.from_env(env)


# -- plugin gate -------------------------------------------------------------------------------
def test_importing_the_plugin_pulls_in_nothing_heavy() -> None:
    import subprocess

    code = (
        "import sys, prfaas_plugin.engines.sglang.plugin as p; "
        "heavy = [m for m in ('sglang', 'torch', 'zmq', 'numpy', 'grpc') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_version_gate() -> None:
    assert plugin.check_sglang_version("0.5.23", env={}) == "0.5.23"
    with pytest.raises(plugin.UnsupportedSGLangVersion, match="supports SGLang 0.5.23, found 0.5.24"):
        plugin.check_sglang_version("0.5.24", env={})
    assert plugin.check_sglang_version("0.5.24", env={plugin.ALLOW_UNTESTED_ENV: "1"}) == "0.5.24"
    with pytest.raises(plugin.UnsupportedSGLangVersion, match="not installed"):
        plugin.check_sglang_version(None, env={})


def test_register_refuses_unsupported_version_without_touching_sglang(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plugin, "installed_sglang_version", lambda: "9.9.9")
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.delenv(plugin.ALLOW_UNTESTED_ENV, raising=False)
    before = set(sys.modules)
    with pytest.raises(plugin.UnsupportedSGLangVersion, match="NOT registered"):
        plugin.register()
    assert not any(m.startswith("sglang") for m in set(sys.modules) - before)
    assert plugin._registered is False


def test_enum_member_injection_keeps_identity() -> None:
    import enum

    class Backend(enum.Enum):
        MOONCAKE = "mooncake"
        FAKE = "fake"

    m = plugin._add_enum_member(Backend, "PRFAAS", "prfaas")
    assert Backend("prfaas") is m is Backend.PRFAAS is Backend["PRFAAS"]
    assert m != Backend.MOONCAKE and Backend("mooncake") is Backend.MOONCAKE
    assert plugin._add_enum_member(Backend, "PRFAAS", "prfaas") is m
    assert [b.value for b in Backend] == ["mooncake", "fake", "prfaas"]
