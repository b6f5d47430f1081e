"""The `--kv-connector` shorthand, as called by vLLM's patched serve parser builder.

The patch under ``patches/`` adds one call, ``add_kv_connector_sugar(parser)``, at the end of
vLLM's ``make_arg_parser`` (the builder that both ``vllm serve`` and ``python -m
vllm.entrypoints.openai.api_server`` use). Everything else lives here, so the text inserted into
vLLM stays a few lines long and the logic is tested like the rest of the package.

The flags are *pure sugar*: after vLLM has parsed the command line, they are turned into the JSON
text of ``--kv-transfer-config`` and converted by vLLM's own converter for that flag, so the result
is exactly what the long form would give. They never leave anything behind in the parsed namespace,
so every other flag behaves as in stock vLLM. Combining them with ``--kv-transfer-config`` is an
error rather than a merge: two sources for one config would make it unclear which one won.

This module imports nothing from vLLM, so its pure functions are tested without vLLM installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

# Short role names on the command line -> vLLM's KVTransferConfig.kv_role values.
ROLES: dict[str, str] = {"producer": "kv_producer", "consumer": "kv_consumer", "both": "kv_both"}

LONG_FLAG = "--kv-transfer-config"
_LONG_DEST = "kv_transfer_config"

# Namespace attribute -> flag. The attributes carry a prefix so they can never shadow a vLLM
# EngineArgs field; they are removed from the namespace once expanded.
FLAGS: dict[str, str] = {
    "prfaas_kv_connector": "--kv-connector",
    "prfaas_kv_role": "--kv-role",
    "prfaas_kv_listen": "--kv-listen",
    "prfaas_kv_extra": "--kv-extra",
}


class SugarError(ValueError):
    """A shorthand flag combination that cannot be expanded; the message is shown to the user."""


def parse_host_port(value: str) -> str:
    """argparse type for ``--kv-listen``: ``HOST:PORT``, IPv6 hosts in brackets.

    Checked here so a typo fails at parse time with the flag's name, not minutes later when the
    connector's receiver tries to bind.
    """
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, e.g. 0.0.0.0:15600, got {value!r}")
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise argparse.ArgumentTypeError(f"unbalanced brackets in IPv6 host of {value!r}")
    elif ":" in host:
        raise argparse.ArgumentTypeError(f"write an IPv6 host in brackets, e.g. [::1]:15600, got {value!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be a number, got {port_text!r} in {value!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 1..65535, got {port} in {value!r}")
    return value


def parse_key_value(value: str) -> tuple[str, Any]:
    """argparse type for ``--kv-extra KEY=VALUE``.

    VALUE is read as JSON when it is valid JSON (numbers, true/false, null, lists, objects) and
    kept as a string otherwise, so ``deadline_s=60`` gives an int and ``name=abc`` a string.
    """
    key, sep, raw = value.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    try:
        parsed: Any = json.loads(raw)
    except json.JSONDecodeError:
        parsed = raw
    return key, parsed


def sugar_to_config(
    connector: str | None,
    role: str | None,
    listen: str | None,
    extras: Sequence[tuple[str, Any]] | None,
) -> dict[str, Any] | None:
    """The ``--kv-transfer-config`` dict the shorthand flags stand for, or None when none is given."""
    if connector is None:
        given = [
            flag for flag, value in (("--kv-role", role), ("--kv-listen", listen), ("--kv-extra", extras)) if value
        ]
        if given:
            raise SugarError(f"{given[0]} needs --kv-connector NAME (it configures that connector)")
        return None
    if not connector.strip():
        raise SugarError("--kv-connector needs a connector name, e.g. --kv-connector prfaas")
    if role is None:
        raise SugarError(
            "--kv-connector needs --kv-role producer|consumer|both (vLLM requires a role for every KV connector)"
        )
    if role not in ROLES:
        raise SugarError(f"--kv-role must be one of {', '.join(ROLES)}, got {role!r}")
    extra: dict[str, Any] = {}
    for key, value in extras or ():
        if key in extra:
            raise SugarError(f"--kv-extra sets {key!r} twice ({extra[key]!r} and {value!r}); give it once")
        extra[key] = value
    if listen is not None:
        if "listen" in extra:
            raise SugarError("--kv-listen and --kv-extra listen=... both set the listen address; give one")
        extra["listen"] = listen
    config: dict[str, Any] = {"kv_connector": connector, "kv_role": ROLES[role]}
    if extra:
        config["kv_connector_extra_config"] = extra
    return config


def _long_action(parser: argparse.ArgumentParser) -> argparse.Action:
    for action in parser._actions:
        if action.dest == _LONG_DEST:
            return action
    raise RuntimeError(
        f"prfaas vllm-cli: this vLLM parser has no {LONG_FLAG}; the installed patch does not match "
        "this vLLM. Run `prfaas vllm-cli uninstall`."
    )


def add_kv_connector_sugar(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the shorthand flags to vLLM's serve parser and expand them after each parse."""
    long_action = _long_action(parser)
    if any(action.dest in FLAGS for action in parser._actions):
        return parser  # already added to this parser
    group = parser.add_argument_group(
        title="KV connector shorthand (prfaas vllm-cli)",
        description=(
            f"Shorthand for {LONG_FLAG}, added by `prfaas vllm-cli install` and removed by "
            "`prfaas vllm-cli uninstall`. `--kv-connector prfaas --kv-role producer "
            "--kv-listen 0.0.0.0:15600` means "
            f"""{LONG_FLAG} '{{"kv_connector":"prfaas","kv_role":"kv_producer",'"""
            """'"kv_connector_extra_config":{"listen":"0.0.0.0:15600"}}'. """
            f"Use either these flags or {LONG_FLAG}, not both."
        ),
    )
    group.add_argument(
        "--kv-connector",
        dest="prfaas_kv_connector",
        metavar="NAME",
        default=None,
        help="KV connector name (kv_connector), e.g. prfaas. Needs --kv-role.",
    )
    group.add_argument(
        "--kv-role",
        dest="prfaas_kv_role",
        choices=tuple(ROLES),
        default=None,
        help="kv_role: producer = kv_producer (prefill), consumer = kv_consumer (decode), both = kv_both.",
    )
    group.add_argument(
        "--kv-listen",
        dest="prfaas_kv_listen",
        metavar="HOST:PORT",
        type=parse_host_port,
        default=None,
        help="Address the connector's transfer receiver listens on (kv_connector_extra_config.listen).",
    )
    group.add_argument(
        "--kv-extra",
        dest="prfaas_kv_extra",
        metavar="KEY=VALUE",
        type=parse_key_value,
        action="append",
        default=None,
        help="One more kv_connector_extra_config entry (repeatable); VALUE is read as JSON if it parses.",
    )

    parse_known = parser.parse_known_args

    def parse_known_args(
        args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, rest = parse_known(args, namespace)
        expand_namespace(parser, long_action, parsed)
        return parsed, rest

    # An instance attribute, so only this parser changes, and both paths into it see it:
    # ArgumentParser.parse_args (the api_server module) and the subparser action (`vllm serve`).
    parser.parse_known_args = parse_known_args  # type: ignore[method-assign,assignment]
    return parser


def expand_namespace(
    parser: argparse.ArgumentParser, long_action: argparse.Action, namespace: argparse.Namespace
) -> None:
    """Replace the shorthand attributes of a parsed namespace by ``kv_transfer_config``."""
    values = {dest: namespace.__dict__.pop(dest, None) for dest in FLAGS}
    try:
        config = sugar_to_config(
            values["prfaas_kv_connector"],
            values["prfaas_kv_role"],
            values["prfaas_kv_listen"],
            values["prfaas_kv_extra"],
        )
    except SugarError as exc:
        parser.error(str(exc))
    if config is None:
        return
    used = " ".join(flag for dest, flag in FLAGS.items() if values[dest])
    text = json.dumps(config, separators=(",", ":"))
    if getattr(namespace, _LONG_DEST, None) is not None:
        parser.error(
            f"{used} cannot be combined with {LONG_FLAG} (the short flags are shorthand for it). "
            f"Give the whole configuration one way: only {LONG_FLAG}, or only the short flags "
            f"(which here mean {LONG_FLAG} '{text}')."
        )
    convert = long_action.type if callable(long_action.type) else (lambda raw: raw)
    try:
        setattr(namespace, _LONG_DEST, convert(text))
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(f"{used} mean {LONG_FLAG} '{text}', which vLLM rejects: {exc}")
    # Printed, not logged: vLLM configures its logging only after the command line is parsed.
    print(f"prfaas vllm-cli: {used} -> {LONG_FLAG} '{text}'", file=sys.stderr)
