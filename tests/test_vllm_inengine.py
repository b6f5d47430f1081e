"""End to end with real vLLM (CPU), no router: clients talk to the local instance directly and it
decides each offload itself (the connector's ``offload`` option) with its exact prefix-cache hit.

One PrfaaS prefill instance and one local instance, started once for the module (the expensive
part). Long cold prompts are prefilled on the PrfaaS instance and their KV pushed here; short
ones prefill here; a long prompt whose prefix this instance already caches stays here when what
is left is within t. Every output equals a single-instance run (the PrfaaS instance serving the
same prompt without kv_transfer_params: greedy is deterministic), and the instance's /metrics
show each decision with its exact uncached length. Then the PrfaaS instance is killed while
offloaded requests are in flight: every request still answers, prefilled here, and no block
leaks.
"""

from __future__ import annotations

import re
import threading
import time

import httpx
import pytest
from vllm_helpers import (
    Supervisor,
    complete,
    free_port,
    metric,
    prfaas_ktc,
    requires_vllm,
    server_argv,
    server_env,
    wait_metric,
)

from prfaas_plugin.faults.proxy import FaultKind, FaultPlan, FaultProxy
from prfaas_plugin.protocol import metrics as M

pytestmark = [pytest.mark.vllm, pytest.mark.slow, requires_vllm, pytest.mark.timeout(1500)]

T = 192  # tokens: the threshold the local instance decides with
LONG = (
    "PrfaaS moves the KV cache of long prompts from a prefill cluster to decode instances over ordinary "
    "Ethernet, so that only requests whose uncached part is long cross the datacenter boundary. "
) * 8


class Fleet:
    def __init__(self, sup: Supervisor, prfaas: str, local: str, proxy: FaultProxy) -> None:
        self.sup, self.prfaas, self.local, self.proxy = sup, prfaas, local, proxy
        self.refs: dict[str, str] = {}

    def log(self) -> str:
        return self.sup.children["local"].log_path.read_text(errors="replace")

    def block_size(self) -> int:
        m = re.search(r"deciding offloads here \(block size (\d+)\)", self.log())
        assert m, "the local instance did not log its offload set-up"
        return int(m.group(1))

    def ntokens(self, prompt: str) -> list[int]:
        r = httpx.post(f"{self.local}/tokenize", json={"prompt": prompt}, timeout=30)
        r.raise_for_status()
        return r.json()["tokens"]

    def ref(self, prompt: str) -> str:
        """The single-instance answer (the PrfaaS instance serving the prompt on its own)."""
        if prompt not in self.refs:
            self.refs[prompt] = complete(self.prfaas, prompt)
        return self.refs[prompt]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny_models_dir):
    from prfaas_plugin.demo.tiny_models import build

    model = build("tiny-qwen3", tiny_models_dir)
    pp, lp, rx = free_port(), free_port(), free_port()
    offload = {
        "prefill_urls": [f"http://127.0.0.1:{pp}"],
        "kv_endpoint": f"127.0.0.1:{rx}",
        "threshold_tokens": T,
        "deadline_s": 30,
        "load_scrape_s": 1,
        "retry_after_s": 600,  # once it is found dead, the PrfaaS instance stays out for the test
    }
    # the KV reaches the local instance's data plane through a fault proxy (forwarding untouched
    # unless a test arms it): the kill test stalls transfers with it, so they are mid-way
    data_port = free_port()
    with (
        FaultProxy(upstream=("127.0.0.1", data_port)) as proxy,
        Supervisor(tmp_path_factory.mktemp("logs-inengine"), own_sessions=False) as sup,
    ):
        sup.start("prfaas", server_argv(model, pp, prfaas_ktc("kv_producer")), env=server_env(0))
        ktc = prfaas_ktc(
            "kv_consumer", f"127.0.0.1:{rx}", offload=offload, data_port=data_port, advertise_data=proxy.endpoint
        )
        sup.start("local", server_argv(model, lp, ktc), env=server_env(1))
        for name, port in (("prfaas", pp), ("local", lp)):
            sup.wait_healthy(name, f"http://127.0.0.1:{port}/health", 900)
        yield Fleet(sup, f"http://127.0.0.1:{pp}", f"http://127.0.0.1:{lp}", proxy)


def _decisions(url: str, decision: str) -> tuple[float, float]:
    """(count, sum of exact uncached lengths) of ``decision`` on the instance's /metrics."""
    h = M.VLLM_OFFLOAD_UNCACHED_TOKENS.name
    text = httpx.get(f"{url}/metrics", timeout=10).text

    def one(suffix: str) -> float:
        pat = rf'^{re.escape(h + suffix)}{{[^}}]*decision="{decision}"[^}}]*}} (\S+)$'
        return sum(float(m.group(1)) for m in re.finditer(pat, text, re.M))

    return one("_count"), one("_sum")


def _decided(fleet: Fleet, prompt: str) -> tuple[str, int, str]:
    """Serve ``prompt`` on the local instance; (decision, exact uncached length, answer) as its
    metrics show them once the decision's stats arrived."""
    before = {d: _decisions(fleet.local, d) for d in ("offload", "local")}
    text = complete(fleet.local, prompt)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = {d: _decisions(fleet.local, d) for d in ("offload", "local")}
        moved = [d for d in after if after[d][0] > before[d][0]]
        if moved:
            assert len(moved) == 1 and after[moved[0]][0] == before[moved[0]][0] + 1, (before, after)
            d = moved[0]
            return d, int(after[d][1] - before[d][1]), text
        time.sleep(0.3)
    raise AssertionError("no decision reached the instance's /metrics")


def test_long_offloaded_short_local_cached_prefix_local(fleet):
    loads0 = metric(fleet.local, M.VLLM_KV_LOADS.exposed)
    # a long cold prompt: its exact uncached length is the whole prompt
    n = len(fleet.ntokens(LONG))
    assert n > T
    decision, uncached, text = _decided(fleet, LONG)
    assert (decision, uncached) == ("offload", n)
    assert text == fleet.ref(LONG), "offloaded output differs from a single instance"
    assert wait_metric(fleet.local, M.VLLM_KV_LOADS.exposed, lambda v: v >= loads0 + 1) == loads0 + 1
    assert re.search(rf"request \S+ offloaded: {n} uncached prompt tokens \(0 cached here\)", fleet.log())

    # a short prompt: local
    short = "Short prompts prefill where they arrive."
    decision, uncached, text = _decided(fleet, short)
    assert (decision, uncached) == ("local", len(fleet.ntokens(short)))
    assert text == fleet.ref(short)

    # the long prompt again with a new tail: its prefix is cached here (the KV that was pushed),
    # so the exact uncached part -- the tail plus the partial block -- is within t: local
    extended = LONG + " The tail is new."
    toks, base = fleet.ntokens(extended), fleet.ntokens(LONG)
    assert len(toks) > T
    common = next((i for i, (a, b) in enumerate(zip(toks, base)) if a != b), min(len(toks), len(base)))
    bs = fleet.block_size()
    decision, uncached, text = _decided(fleet, extended)
    cached = len(toks) - uncached
    assert decision == "local" and uncached <= T, (decision, uncached)
    assert cached % bs == 0 and 0 < cached <= common, (cached, common, bs)  # whole blocks of the shared prefix
    assert cached > common - 2 * bs  # all of it, but for the partial last block and the N-1 backoff's token
    assert text == fleet.ref(extended)
    assert metric(fleet.local, M.VLLM_KV_LOADS.exposed) == loads0 + 1  # no second load


def _usage(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    m = re.search(r"^vllm:kv_cache_usage_perc\{[^}]*\} (\S+)$", text, re.M)
    assert m, "no vllm:kv_cache_usage_perc in /metrics"
    return float(m.group(1))


def test_prfaas_killed_mid_run_every_request_answers_locally(fleet):
    prompts = [f"Request {i} of the run that loses its PrfaaS instance. " + LONG for i in range(4)]
    prompts.append("Short, during the failure.")
    refs = [fleet.ref(p) for p in prompts]  # while the PrfaaS instance still serves
    late = "After the failure. " + LONG
    late_ref = fleet.ref(late)
    fail_metric = M.VLLM_OFFLOAD_FAILURES.exposed
    failures0 = metric(fleet.local, fail_metric)
    load_failures0 = metric(fleet.local, M.VLLM_KV_LOAD_FAILURES.exposed)
    answers: dict[int, str | BaseException] = {}

    def ask(i: int) -> None:
        try:
            answers[i] = complete(fleet.local, prompts[i])
        except BaseException as exc:
            answers[i] = exc

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    offloaded0 = _decisions(fleet.local, "offload")[0]
    up0 = fleet.proxy.stats.bytes_up
    # 4 KiB into the transfers the data path goes silent (held, not forwarded, until the end of the
    # test's kill: the bytes the PrfaaS instance wrote before dying must not land afterwards)
    fleet.proxy.set_fault(FaultPlan(FaultKind.BLACKHOLE, after_bytes=4096, per_connection=False))
    try:
        for th in threads:
            th.start()
        deadline = time.monotonic() + 120
        while _decisions(fleet.local, "offload")[0] < offloaded0 + 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _decisions(fleet.local, "offload")[0] == offloaded0 + 4, "the long prompts were not offloaded"
        while fleet.proxy.stats.bytes_up == up0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert fleet.proxy.stats.bytes_up > up0, "no transfer started"
        time.sleep(1.0)
        in_flight = sum(1 for th in threads[:4] if th.is_alive())
        assert in_flight >= 1, "every offloaded request was done before the kill"
        fleet.sup.stop("prfaas", grace_s=0)  # SIGTERM then SIGKILL at once: the instance is gone mid-run
        t_kill = time.monotonic()
        for th in threads:
            th.join(timeout=120)
        answered_in = time.monotonic() - t_kill
    finally:
        fleet.proxy.set_fault(FaultPlan())
    for i, p in enumerate(prompts):
        assert answers.get(i) == refs[i], f"request {i}: {answers.get(i)!r}"
    # at the latest, a load whose sender vanished fails at its 30 s deadline; then the prefill here
    assert answered_in < 30 + 20, f"the requests waited {answered_in:.1f} s after the kill"
    # a request after the failure: PrfaaS left out, prefilled here at once
    assert complete(fleet.local, late) == late_ref
    # the loads the kill cut off are counted as failed loads, the late request's offload (to a
    # dead instance) as a failed offload -- or it was kept local at once, the instance being out
    load_failures = wait_metric(fleet.local, M.VLLM_KV_LOAD_FAILURES.exposed, lambda v: v >= load_failures0 + in_flight)
    assert load_failures >= load_failures0 + in_flight, (load_failures, load_failures0, in_flight)
    got = wait_metric(fleet.local, fail_metric, lambda v: v >= failures0 + 1)
    busy = httpx.get(f"{fleet.local}/metrics", timeout=10).text.count('reason="prfaas_unavailable"')
    assert got >= failures0 + 1 or busy, "the PrfaaS failure was neither counted nor acted on"
    log = fleet.log()
    assert "offloaded prefill of request" in log and "prefills here" in log
    # nothing leaks here: every block is free again once the requests are done
    deadline = time.monotonic() + 60
    while _usage(fleet.local) != 0.0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _usage(fleet.local) == 0.0, "the local instance leaked blocks"
    print(
        f"\nPrfaaS killed with {in_flight} offloaded requests mid-transfer: all {len(prompts)} answered, the last "
        f"{answered_in:.1f} s after the kill"
    )
