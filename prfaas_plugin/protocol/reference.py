"""The reference section of docs/protocol.md, rendered from this package so the document cannot
drift from the code: ``python -m prfaas_plugin.protocol.reference --write docs/protocol.md``
rewrites the part between the markers, and a test fails while the file differs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from prfaas_plugin.protocol import metrics as M
from prfaas_plugin.protocol import requests as R
from prfaas_plugin.protocol import transfer as T

BEGIN = "<!-- BEGIN generated: python -m prfaas_plugin.protocol.reference --write docs/protocol.md -->"
END = "<!-- END generated -->"


def _table(head: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def render() -> str:
    lines = [
        "## Reference",
        "",
        f"Request protocol version **{R.REQUEST_PROTOCOL_VERSION}** "
        f"(`kv_transfer_params.{R.VERSION_KEY}`); transfer service `{T.GRPC_SERVICE}`, "
        f"wire protocol version **{T.TRANSFER_PROTOCOL_VERSION}** (`OpenRequest.protocol_version`).",
        "",
        "### `kv_transfer_params` of a request",
        "",
        *_table(("field", "type", "sent to", "meaning"), [(f"`{n}`", t, who, m) for n, t, who, m in R.PARAM_FIELDS]),
        "",
        "### `kv_transfer_params` of a producer's answer",
        "",
        *_table(("field", "type", "meaning"), [(f"`{n}`", t, m) for n, t, m in R.OUTCOME_FIELDS]),
        "",
        "### Fields added for SGLang's bootstrap protocol",
        "",
        *_table(("field", "type", "meaning"), [(f"`{n}`", t, m) for n, t, m in R.SGLANG_FIELDS]),
        "",
        "### Metrics",
        "",
        "Counters appear on `/metrics` with `_total` appended (the name shown here).",
        "",
    ]
    for title, specs in (
        ("router (`prfaas router`, its own `/metrics`)", M.ROUTER),
        ("vLLM connector (the instance's `/metrics`)", M.VLLM),
        ("SGLang backend (SGLang's `/metrics` with `--enable-metrics`)", M.SGLANG),
        ("transfer engine (`TransferCollector`)", M.TRANSFER),
        ("read from the engines by the router (`replicas.load_scrape_s`; not exported here)", M.READ_FROM_ENGINES),
    ):
        rows = [(f"`{s.exposed}`", s.kind, ", ".join(s.labels) or "-", s.help) for s in specs]
        lines += [f"**{title}**", "", *_table(("name", "type", "labels", "meaning"), rows), ""]
    return "\n".join(lines).rstrip() + "\n"


def splice(doc: str) -> str:
    """``doc`` with the generated section replaced (appended, with markers, if absent)."""
    block = f"{BEGIN}\n{render()}{END}"
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        return head + block + rest.split(END, 1)[1]
    return doc.rstrip() + "\n\n" + block + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--write", metavar="FILE", help="rewrite the generated section of FILE (else print it)")
    args = ap.parse_args(argv)
    if args.write is None:
        sys.stdout.write(render())
        return 0
    path = Path(args.write)
    path.write_text(splice(path.read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
