"""End to end with real vLLM (CPU) across TP sizes: prefill TP2 -> decode TP1 and prefill TP1 ->
decode TP2 through the prfaas connector, output equal to a single instance.

Two instances, started once: one at TP 2 and one at TP 1, each ``kv_both`` with ``peer_tp_size``
naming the other's TP size, so each serves as the producer of one direction and the consumer of
the other (two servers instead of four on a 2-core box; ~50 s here, start-up included). The model is the hybrid
``tiny-qwen3next-tp2`` (GQA full attention + GDN linear attention, 2 heads of each kind, so both
are split across the TP-2 ranks). The single-instance reference is the decode instance serving the
prompt alone; a greedy token may only differ on a near-tie (``compare_greedy``: TP 2 and TP 1 round
bf16 differently, as P/D and one pass do), never by a KV or state that landed wrong.
"""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest
from vllm_helpers import Supervisor, compare_greedy, free_port, prfaas_ktc, requires_vllm, server_argv, server_env

pytestmark = [pytest.mark.vllm, pytest.mark.slow, requires_vllm, pytest.mark.timeout(1500)]

MODEL = "tiny-qwen3next-tp2"
PROMPT = (
    "PrfaaS moves the KV cache of long prompts from a prefill cluster to decode instances. "
    "Hybrid models keep a recurrent state for linear layers and a cache for attention layers. "
) * 3


class Instances:
    def __init__(self, sup: Supervisor, urls: dict[int, str], rx: dict[int, str]) -> None:
        self.sup, self.url, self.rx = sup, urls, rx


@pytest.fixture(scope="module")
def instances(tmp_path_factory, tiny_models_dir):
    from prfaas_plugin.demo.tiny_models import build

    model = build(MODEL, tiny_models_dir)
    # one session for both servers (own process groups): three ranks share two cores here, and
    # across sessions the autogroup scheduler let the waiting instance's busy-polling worker keep
    # a TP-2 rank from its core for minutes (Supervisor docstring)
    with Supervisor(tmp_path_factory.mktemp("logs-tp"), own_sessions=False) as sup:
        urls, rx = {}, {}
        for tp_size, peer, bind in ((2, 1, "0|1"), (1, 2, "1")):
            port, listen = free_port(), free_port()
            argv = server_argv(model, port, prfaas_ktc("kv_both", f"127.0.0.1:{listen}", peer_tp_size=peer))
            if tp_size > 1:
                argv += ["--tensor-parallel-size", str(tp_size), "--distributed-executor-backend", "mp"]
            sup.start(f"tp{tp_size}", argv, env={**server_env(0), "VLLM_CPU_OMP_THREADS_BIND": bind})
            urls[tp_size], rx[tp_size] = f"http://127.0.0.1:{port}", f"127.0.0.1:{listen}"
        for tp_size, url in urls.items():
            sup.wait_healthy(f"tp{tp_size}", f"{url}/health", 900)
        yield Instances(sup, urls, rx)


BODY = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "logprobs": 5}


def _single(url: str) -> dict:
    r = httpx.post(f"{url}/v1/completions", json=BODY, timeout=300)
    r.raise_for_status()
    return r.json()["choices"][0]


def _pd(inst: Instances, prefill_tp: int, decode_tp: int):
    from prfaas_plugin.engines.vllm.pd_client import complete_pd

    async def go():
        async with httpx.AsyncClient(timeout=300) as c:
            return await complete_pd(c, inst.url[prefill_tp], inst.url[decode_tp], inst.rx[decode_tp], BODY, 120.0)

    return asyncio.run(go())


def _loads(inst: Instances, decode_tp: int, transfer_id: str) -> list[int]:
    """Bytes each decode rank logged for the load (one line per rank): received plus those its
    prefix cache already held (not sent)."""
    log = inst.sup.children[f"tp{decode_tp}"].log_path.read_text(errors="replace")
    pat = rf"loaded transfer {re.escape(transfer_id)} for request \S+: (\d+) bytes in \d+ items \((\d+) more bytes"
    return [int(a) + int(b) for a, b in re.findall(pat, log)]


@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(2, 1), (1, 2)], ids=["P-TP2-D-TP1", "P-TP1-D-TP2"])
def test_pd_across_tp_sizes_equals_single_instance(instances, prefill_tp, decode_tp):
    ref = _single(instances.url[decode_tp])
    res = _pd(instances, prefill_tp, decode_tp)
    xfer = res.transfer
    assert xfer.get("status") == "sent", xfer
    got = res.consumer["choices"][0]
    verdict = compare_greedy(ref, got)
    print(f"\n[P TP{prefill_tp} -> D TP{decode_tp}] {verdict}: {got['text']!r} vs single {ref['text']!r}")
    assert verdict in ("exact", "near-tie"), (
        f"P/D output differs from single instance:\n{got['text']!r}\n{ref['text']!r}"
    )
    # every decode rank loaded its share; every layer part of this model is split by heads, so
    # together the decode ranks received one whole-model copy: prefill TP x one prefill rank's
    # bytes (the producer's ``bytes`` is one rank's layout prediction)
    per_rank = _loads(instances, decode_tp, xfer["transfer_id"])
    assert len(per_rank) == decode_tp, per_rank
    assert len(set(per_rank)) == 1, f"decode ranks received unequal shares {per_rank}"
    assert sum(per_rank) == prefill_tp * xfer["bytes"], (per_rank, xfer["bytes"])
