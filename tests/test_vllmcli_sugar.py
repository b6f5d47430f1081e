"""The shorthand expansion itself, on a stand-in for vLLM's parser (real vLLM: test_vllmcli_vllm.py).

The stand-in only provides what the sugar relies on: a ``--kv-transfer-config`` option whose
``type`` converts JSON text, reached through ``parse_args`` and through a subparser.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

import pytest

from prfaas_plugin.engines.vllm_cli.sugar import (
    FLAGS,
    SugarError,
    add_kv_connector_sugar,
    parse_host_port,
    parse_key_value,
    sugar_to_config,
)


class _Config(dict):
    """What vLLM's converter returns for --kv-transfer-config: here, the decoded dict."""


def _convert(text: str) -> _Config:
    data = json.loads(text)
    if data.get("kv_role") not in (None, "kv_producer", "kv_consumer", "kv_both"):
        raise ValueError(f"bad kv_role {data.get('kv_role')!r}")
    return _Config(data)


def _serve_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="serve")
    parser.add_argument("model_tag", nargs="?")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--kv-transfer-config", type=_convert, default=None)
    return parser


def _patched() -> argparse.ArgumentParser:
    return add_kv_connector_sugar(_serve_parser())


def test_role_names_map_to_vllm_roles() -> None:
    for short, long in (("producer", "kv_producer"), ("consumer", "kv_consumer"), ("both", "kv_both")):
        assert sugar_to_config("prfaas", short, None, None) == {"kv_connector": "prfaas", "kv_role": long}


def test_listen_and_extras_go_to_extra_config() -> None:
    config = sugar_to_config("prfaas", "consumer", "0.0.0.0:15600", [("deadline_s", 60), ("name", "d1")])
    assert config == {
        "kv_connector": "prfaas",
        "kv_role": "kv_consumer",
        "kv_connector_extra_config": {"deadline_s": 60, "name": "d1", "listen": "0.0.0.0:15600"},
    }


def test_no_flags_means_no_config() -> None:
    assert sugar_to_config(None, None, None, None) is None


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ((None, "producer", None, None), "--kv-role needs --kv-connector"),
        ((None, None, "1.2.3.4:5", None), "--kv-listen needs --kv-connector"),
        ((None, None, None, [("a", 1)]), "--kv-extra needs --kv-connector"),
        (("prfaas", None, None, None), "--kv-connector needs --kv-role producer|consumer|both"),
        (("  ", "producer", None, None), "needs a connector name"),
        (("prfaas", "prefill", None, None), "--kv-role must be one of producer, consumer, both"),
        (("prfaas", "both", None, [("a", 1), ("a", 2)]), "--kv-extra sets 'a' twice"),
        (("prfaas", "both", "h:1", [("listen", "h:2")]), "--kv-listen and --kv-extra listen"),
    ],
)
def test_bad_combinations_are_refused(args: tuple[Any, ...], needle: str) -> None:
    with pytest.raises(SugarError, match=re.escape(needle)):
        sugar_to_config(*args)


@pytest.mark.parametrize("value", ["0.0.0.0:15600", "host.example:1", "[::1]:65535", "[fe80::1]:80"])
def test_host_port_accepts(value: str) -> None:
    assert parse_host_port(value) == value


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("15600", "expected HOST:PORT"),
        (":15600", "expected HOST:PORT"),
        ("::1:80", "IPv6 host in brackets"),
        ("[::1:80", "unbalanced brackets"),
        ("[]:80", "unbalanced brackets"),
        ("h:port", "port must be a number"),
        ("h:0", "1..65535"),
        ("h:70000", "1..65535"),
    ],
)
def test_host_port_refuses(value: str, needle: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(needle)):
        parse_host_port(value)


def test_key_value_reads_json_values_and_keeps_strings() -> None:
    assert parse_key_value("deadline_s=60") == ("deadline_s", 60)
    assert parse_key_value("on=true") == ("on", True)
    assert parse_key_value("hosts=[1,2]") == ("hosts", [1, 2])
    assert parse_key_value("name=abc") == ("name", "abc")
    assert parse_key_value("expr=a=b") == ("expr", "a=b")
    assert parse_key_value("empty=") == ("empty", "")
    for bad in ("novalue", "=1"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected KEY=VALUE"):
            parse_key_value(bad)


def test_short_form_equals_long_form_through_the_parsers_converter() -> None:
    short = _patched().parse_args(
        ["m", "--kv-connector", "prfaas", "--kv-role", "producer", "--kv-listen", "10.0.0.7:15600"]
    )
    long = _patched().parse_args(
        [
            "m",
            "--kv-transfer-config",
            '{"kv_connector":"prfaas","kv_role":"kv_producer","kv_connector_extra_config":{"listen":"10.0.0.7:15600"}}',
        ]
    )
    assert isinstance(short.kv_transfer_config, _Config)
    assert vars(short) == vars(long)


def test_shorthand_leaves_nothing_in_the_namespace() -> None:
    plain = _serve_parser().parse_args(["m", "--port", "9"])
    patched = _patched().parse_args(["m", "--port", "9"])
    assert vars(plain) == vars(patched)
    assert not set(FLAGS) & set(vars(patched))


def test_expansion_prints_what_it_means(capsys: pytest.CaptureFixture[str]) -> None:
    _patched().parse_args(["m", "--kv-connector=prfaas", "--kv-role=both"])
    err = capsys.readouterr().err
    assert """--kv-transfer-config '{"kv_connector":"prfaas","kv_role":"kv_both"}'""" in err


@pytest.mark.parametrize(
    "long",
    [["--kv-transfer-config", '{"kv_connector":"X","kv_role":"kv_both"}'], ["--kv-transfer-config={}"]],
)
def test_conflict_with_long_form_names_both_flags(capsys: pytest.CaptureFixture[str], long: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _patched().parse_args(["m", "--kv-connector", "prfaas", "--kv-role", "producer", *long])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--kv-connector --kv-role cannot be combined with --kv-transfer-config" in err


def test_rejection_by_the_converter_is_reported_with_the_expansion(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="serve")
    parser.add_argument("--kv-transfer-config", type=lambda text: (_ for _ in ()).throw(ValueError("no")))
    add_kv_connector_sugar(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-connector", "prfaas", "--kv-role", "both"])
    assert "which vLLM rejects: no" in capsys.readouterr().err


def test_bad_flag_values_exit_with_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, needle in (
        (["--kv-connector", "prfaas"], "--kv-connector needs --kv-role"),
        (["--kv-role", "producer"], "--kv-role needs --kv-connector"),
        (["--kv-connector", "p", "--kv-role", "prefill"], "invalid choice: 'prefill'"),
        (["--kv-connector", "p", "--kv-role", "both", "--kv-listen", "nope"], "expected HOST:PORT"),
    ):
        with pytest.raises(SystemExit) as info:
            _patched().parse_args(argv)
        assert info.value.code == 2
        assert needle in capsys.readouterr().err


def test_works_through_a_subparser_like_vllm_serve() -> None:
    top = argparse.ArgumentParser(prog="vllm")
    sub = top.add_subparsers(dest="subparser")
    add_kv_connector_sugar(_serve_parser(sub.add_parser("serve")))
    args = top.parse_args(["serve", "m", "--kv-connector", "prfaas", "--kv-role", "consumer"])
    assert args.subparser == "serve"
    assert args.kv_transfer_config == {"kv_connector": "prfaas", "kv_role": "kv_consumer"}
    assert not set(FLAGS) & set(vars(args))


def test_adding_twice_keeps_one_set_of_flags() -> None:
    parser = _patched()
    assert add_kv_connector_sugar(parser) is parser
    assert sum(action.dest == "prfaas_kv_connector" for action in parser._actions) == 1


def test_parser_without_long_flag_is_refused() -> None:
    with pytest.raises(RuntimeError, match="no --kv-transfer-config"):
        add_kv_connector_sugar(argparse.ArgumentParser())
