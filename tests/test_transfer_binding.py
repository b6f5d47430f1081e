"""``prfaas_plugin.transfer.binding``: the item-name codec, ports per rank, TLS options and the
staged sink that both engine adapters use."""

from __future__ import annotations

import pytest

from prfaas_plugin.transfer import ItemSpec
from prfaas_plugin.transfer.binding import (
    EndpointSpec,
    EngineTransport,
    ItemNameCodec,
    ItemNameError,
    StagedSink,
    TlsOptions,
    join_hostport,
    rank_port,
)
from prfaas_plugin.transfer.receiver import GrpcTcpReceiver
from prfaas_plugin.transfer.sender import GrpcTcpSender


def test_codec_with_head_round_trips_and_refuses_other_shapes():
    kv = ItemNameCodec("kv", ("", "", ""))
    assert kv.encode(3, 128, 64) == "kv.3.128.64"
    assert kv.decode("kv.3.128.64") == ((3, 128, 64), "")
    for bad in ("kv.3.128", "kv.3.128.64.1", "st.3.128.64", "kv.3.x.64", "kv.3.-1.64", "kv.3.١.64", "kv..1.2"):
        assert not kv.matches(bad), bad
        with pytest.raises(ItemNameError):
            kv.decode(bad)


def test_codec_with_labels_and_a_dotted_tail():
    c = ItemNameCodec("", ("g", "b"), tail=True)
    assert c.encode(1, 16, tail="model.layers.0.attn") == "g1.b16.model.layers.0.attn"
    assert c.decode("g1.b16.model.layers.0.attn") == ((1, 16), "model.layers.0.attn")
    for bad in ("g1.b16", "g1.b16.", "b1.g16.L", "g1.16.L", "gx.b1.L"):
        with pytest.raises(ItemNameError):
            c.decode(bad)


def test_codec_refuses_bad_values():
    c = ItemNameCodec("st", ("", ""))
    with pytest.raises(ItemNameError, match="2 fields"):
        c.encode(1)
    with pytest.raises(ItemNameError, match=">= 0"):
        c.encode(1, -2)
    with pytest.raises(ItemNameError, match="no tail"):
        c.encode(1, 2, tail="x")
    with pytest.raises(ItemNameError, match="tail is required"):
        ItemNameCodec("", ("g",), tail=True).encode(1)


def test_rank_ports_and_hostports():
    assert [rank_port(15600, r) for r in range(3)] == [15600, 15601, 15602]
    assert rank_port(0, 5) == 0  # any free port, per rank
    with pytest.raises(ValueError):
        rank_port(-1, 0)
    with pytest.raises(ValueError, match="past 65535"):
        rank_port(65530, 6)
    assert join_hostport("::1", 5) == "[::1]:5"
    assert join_hostport("10.0.0.1", 5) == "10.0.0.1:5"


def test_tls_options_per_role():
    assert TlsOptions().config(server=True) is None
    o = TlsOptions(cert="c.pem", key="k.pem", ca="ca.pem", require_client_cert=True)
    assert o.config(server=True).require_client_cert
    client = o.config(server=False)
    assert not client.require_client_cert and client.ca_file == "ca.pem" and client.cert_file == "c.pem"
    assert TlsOptions(ca="ca.pem").config(server=False).cert_file is None
    with pytest.raises(ValueError, match="go together"):
        TlsOptions(cert="c.pem").config(server=True)


def test_engine_transport_builds_the_configured_endpoints():
    t = EngineTransport(EndpointSpec(sender_id="s1", receiver_id="r1", connections=3, pacing_gbps=2.0))
    rx = t.receiver("127.0.0.1", 0)
    tx = t.sender()
    try:
        assert isinstance(rx, GrpcTcpReceiver) and rx.config.receiver_id == "r1" and rx.config.tls is None
        assert isinstance(tx, GrpcTcpSender)
        assert (tx.config.sender_id, tx.config.connections, tx.config.pacing_gbps) == ("s1", 3, 2.0)
    finally:
        tx.close()
        rx.close()


class _Sink(StagedSink[bytearray]):
    """Items named "direct.*" land in place; the others in a staging copy committed at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.dest: dict[str, bytearray] = {}
        self.commits: list[str] = []

    def land(self, item: ItemSpec) -> tuple[memoryview, bytearray | None]:
        if item.nbytes > 8:
            raise ValueError("too big")
        if item.name.startswith("direct."):
            self.dest[item.name] = bytearray(item.nbytes)
            return memoryview(self.dest[item.name]), None
        staged = bytearray(item.nbytes)
        return memoryview(staged), staged

    def commit(self, item: ItemSpec, staged: bytearray) -> None:
        self.commits.append(item.name)
        self.dest[item.name] = bytearray(staged)


def test_staged_sink_commits_staged_items_once_and_leaves_in_place_ones():
    sink = _Sink()
    a, b = ItemSpec("direct.a", 4), ItemSpec("staged.b", 4)
    va, vb = sink.buffer_for(a), sink.buffer_for(b)
    va[:] = b"aaaa"
    vb[:] = b"bbbb"
    assert "staged.b" not in sink.dest  # not before the item is complete
    sink.item_done(a)
    sink.item_done(b)
    sink.item_done(b)  # a repeated completion commits nothing more
    assert sink.commits == ["staged.b"]
    assert sink.dest == {"direct.a": bytearray(b"aaaa"), "staged.b": bytearray(b"bbbb")}
    with pytest.raises(ValueError, match="too big"):
        sink.buffer_for(ItemSpec("staged.c", 9))


# ----------------------------------------------------------------------------------------------
# TLS settings: one definition for both adapters, refused with the option's name
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from transfer_helpers import make_pki

    return make_pki(tmp_path_factory.mktemp("pki"))


def _adapters():
    """Both adapters' settings models, which must take the TLS keys from the one definition."""
    from prfaas_plugin.engines.sglang.config import BackendConfig

    out = [BackendConfig]
    try:
        from prfaas_plugin.engines.vllm.options import Options

        out.append(Options)
    except ImportError:  # vllm absent: the SGLang model still proves the shared rules
        pass
    return out


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tls_key": "k.pem"}, r"tls_cert and tls_key go together \(tls_cert is missing\)"),
        ({"tls_cert": "c.pem"}, r"tls_cert and tls_key go together \(tls_key is missing\)"),
        ({"tls_cert": "c.pem", "tls_key": "k.pem", "tls_require_client_cert": True}, "needs tls_ca"),
        ({"tls_ca": ""}, "tls_ca must be a path, not empty"),
    ],
)
def test_tls_settings_refuse_incomplete_pairs_in_every_adapter(kwargs, message):
    from pydantic import ValidationError

    from prfaas_plugin.transfer.binding import ChannelSettings

    for model in _adapters():
        assert issubclass(model, ChannelSettings)
        with pytest.raises(ValidationError, match=message):
            model(**kwargs)


def test_sglang_env_names_the_tls_variable():
    from prfaas_plugin.engines.sglang.config import BackendConfig

    with pytest.raises(ValueError, match=r"^PRFAAS_SGLANG_TLS_CERT and PRFAAS_SGLANG_TLS_KEY go together"):
        BackendConfig.from_env({"PRFAAS_SGLANG_TLS_KEY": "/k.pem"})
    cfg = BackendConfig.from_env({"PRFAAS_SGLANG_TLS_CA": "/ca.pem"})
    assert cfg.tls_options() == TlsOptions(ca="/ca.pem")


def test_tls_file_checks_name_the_option(pki, tmp_path):
    cert, key = pki["server"]
    ca = pki["ca.paths"][0]
    TlsOptions(cert, key, ca, True).check(server=True)  # a good receiver
    TlsOptions(ca=ca).check(server=False)  # a sender that only verifies
    TlsOptions().check(server=True)  # TLS off: nothing to check
    with pytest.raises(ValueError, match=r"tls_cert '/nonexistent/c.pem' cannot be read: No such file"):
        TlsOptions("/nonexistent/c.pem", key, ca).check(server=True)
    with pytest.raises(ValueError, match=r"tls_ca '/nonexistent/ca.pem' cannot be read"):
        TlsOptions(cert, key, "/nonexistent/ca.pem").check(server=False)
    with pytest.raises(ValueError, match="a receiver serving TLS needs tls_cert and tls_key"):
        TlsOptions(ca=ca).check(server=True)
    with pytest.raises(ValueError, match="are not a PEM certificate and its private key"):
        TlsOptions(cert, pki["client"][1]).check(server=True)  # another certificate's key
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="tls_ca .* is not a PEM CA certificate bundle"):
        TlsOptions(cert, key, str(garbage)).check(server=True)


def test_integrity_settings_in_every_adapter_reach_both_endpoints():
    """``checksums`` / ``allow_unverified_plaintext``: one definition for both adapters; what a
    user sets is what the sender offers and the receiver accepts."""
    from prfaas_plugin.engines.sglang.transport import endpoint_spec as sglang_spec

    specs = [sglang_spec(_adapters()[0](checksums="crc32c, crc32"))]
    if len(_adapters()) > 1:
        specs.append(_adapters()[1](checksums=["crc32c", "crc32"]).endpoint_spec("e"))
    for spec in specs:
        t = EngineTransport(spec)
        rx, tx = t.receiver("127.0.0.1", 0), t.sender()
        try:
            assert rx.config.effective_checksums == ("crc32c", "crc32")
            assert tx.config.effective_checksums == ("crc32c", "crc32")
        finally:
            tx.close()
            rx.close()
    default = EngineTransport(EndpointSpec("s", "r")).sender()
    try:
        assert default.config.effective_checksums[0] == "xxh3-64"  # corruption detection stays on
    finally:
        default.close()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"checksums": ["none"]}, r"allow 'none' on a plaintext data plane.*allow_unverified_plaintext"),
        ({"checksums": ["md5"]}, r"checksums must be a non-empty subset of"),
        ({"checksums": []}, r"checksums must be a non-empty subset of"),
    ],
)
def test_integrity_settings_refuse_unsafe_or_unknown_choices_in_every_adapter(kwargs, message):
    from pydantic import ValidationError

    for model in _adapters():
        with pytest.raises(ValidationError, match=message):
            model(**kwargs)
        assert model(checksums=["none"], allow_unverified_plaintext=True).checksums == ("none",)
        assert model(checksums=["none"], tls_ca="/ca.pem").checksums == ("none",)  # TLS authenticates


def test_sglang_env_names_the_integrity_variable():
    from prfaas_plugin.engines.sglang.config import BackendConfig

    with pytest.raises(ValueError, match=r"^PRFAAS_SGLANG_CHECKSUMS .*PRFAAS_SGLANG_ALLOW_UNVERIFIED_PLAINTEXT"):
        BackendConfig.from_env({"PRFAAS_SGLANG_CHECKSUMS": "none"})
    cfg = BackendConfig.from_env({"PRFAAS_SGLANG_CHECKSUMS": "xxh3-64,crc32c"})
    assert cfg.checksums == ("xxh3-64", "crc32c")
