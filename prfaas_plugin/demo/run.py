"""The whole PrfaaS deployment on one CPU machine.

  PrfaaS "cluster" (namespace A)          emulated WAN (tbf rate + delay line)        local "cluster" (here)
  vLLM kv_producer  --- KV pushed over the link (multi-connection TCP) --->  vLLM kv_consumer (+ local prefill)
                                                                             prfaas router (auto threshold)

Steps: build a tiny Qwen3-Next-style hybrid model offline; emulate the link (or fall back to
loopback when namespaces cannot be made); start both vLLM instances and measure their prefill
profile; write a planner config from that profile and the model's KV size; start the router with
``threshold: auto``; send a scaled log-normal workload through it; re-run every prompt on the
local instance alone and compare outputs; write the report. Everything started is stopped, also
on Ctrl-C.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from prfaas_plugin.demo.calibrate import calibrate
from prfaas_plugin.demo.client import stream_completion
from prfaas_plugin.demo.report import DemoReport, RequestRecord
from prfaas_plugin.demo.supervisor import Supervisor
from prfaas_plugin.demo.workload import WorkloadSpec, build_prompts
from prfaas_plugin.netemu import EmulatedLink, LinkSpec, netns_unavailable_reason

MODEL = "tiny-qwen3next"
MAX_MODEL_LEN = 2048
#: What the report keeps of the router's record of each request (router/records.py), for
#: telling where a request's time went (bench/sim_validate.py).
ROUTER_FIELDS = ("started_at", "l_total", "l_prefix", "queue_s", "prefill_s", "ttft_s", "overhead_s", "transfer_status")


@dataclass
class DemoOptions:
    out_dir: Path = Path("out/demo")
    requests: int = 24
    link_gbit: float = 1.0
    rtt_ms: float = 20.0
    emulate: str = "auto"  # auto | netns | loopback
    threshold: str = "auto"  # "auto" or a number of tokens
    output_tokens: int = 12
    concurrency: int = 2
    startup_timeout_s: float = 420.0
    seed: int = 0
    log: Callable[[str], None] = field(default=lambda m: print(m, flush=True))


def _ktc(role: str, **extra: object) -> str:
    return json.dumps({"kv_connector": "prfaas", "kv_role": role, "kv_connector_extra_config": extra})


def _server(model: Path, host: str, port: int, ktc: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        MODEL,
        "--host",
        host,
        "--port",
        str(port),
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--dtype",
        "bfloat16",
        "--seed",
        "0",
        "--kv-transfer-config",
        ktc,
    ]


def _env(cpu: int) -> dict[str, str]:
    root = Path(__file__).resolve().parents[2]
    return {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": str(cpu),
        "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p),
    }


def _prefill_profile(url: str, count_tokens: Callable[[str], int], lengths: list[int]) -> list[float]:
    """Seconds to prefill each length (max_tokens=1): the fastest of 3 fresh prompts after a warm-up
    (the minimum is the least disturbed by the other instance sharing the machine)."""
    import random

    from prfaas_plugin.demo.workload import grow_to

    out = []
    with httpx.Client(timeout=120) as c:
        c.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "warm up", "max_tokens": 1})
        for i, n in enumerate(lengths):
            prompt = grow_to("", n, count_tokens, random.Random(1000 + i), tag=9000 + i)
            times = []
            for rep in range(3):
                t0 = time.perf_counter()
                r = c.post(
                    f"{url}/v1/completions",
                    json={"model": MODEL, "prompt": f"{rep}{prompt}", "max_tokens": 1, "temperature": 0},
                )
                r.raise_for_status()
                times.append(time.perf_counter() - t0)
            out.append(sorted(times)[0])
    return out


def _planner_config(
    path: Path,
    lengths: list[int],
    t_remote: list[float],
    t_local: list[float],
    kv_mib: list[float],
    link_gbit: float,
    workload: WorkloadSpec,
) -> None:
    import math

    cfg = {
        "notes": "written by `prfaas demo` from prefill times measured on the two CPU instances",
        "workload": {
            "lognormal": {
                "mu": workload.mu + math.log(workload.scale),
                "sigma": workload.sigma,
                "min": workload.min_tokens,
                "max": workload.max_tokens,
            },
            "output_tokens": workload.output_tokens,
        },
        "profiles": {
            "prfaas-cpu": {
                "lengths": lengths,
                "t_prefill_s": t_remote,
                "s_kv_mib": kv_mib,
                "t_interpolation": "linear",
            },
            "local-cpu": {"lengths": lengths, "t_prefill_s": t_local, "s_kv_mib": kv_mib, "t_interpolation": "linear"},
        },
        # One local instance prefills and decodes; the model counts it as one of each.
        "deployment": {
            "prfaas_profile": "prfaas-cpu",
            "pd_profile": "local-cpu",
            "prfaas_instances": 1,
            "pd_instances": 2,
        },
        "decode": {"bs_max": 8, "t_decode_s": 0.02},
        "link": {"gbps": link_gbit},
        "search": {"threshold_step": 8},
    }
    yaml.SafeDumper.ignore_aliases = lambda *_a: True
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def run_demo(opts: DemoOptions) -> DemoReport:
    from prfaas_plugin.demo.tiny_models import build
    from prfaas_plugin.kvsize import ModelKV

    log = opts.log
    out = Path(opts.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    model_dir = build(MODEL, out / "models", seed=opts.seed)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    count = lambda s: len(tok(s)["input_ids"])  # noqa: E731
    spec = WorkloadSpec(
        num_requests=opts.requests,
        output_tokens=opts.output_tokens,
        seed=opts.seed,
        max_tokens=MAX_MODEL_LEN - opts.output_tokens - 64,
    )
    prompts = build_prompts(spec, count)

    reason = netns_unavailable_reason()
    use_netns = opts.emulate == "netns" or (opts.emulate == "auto" and reason is None)
    if opts.emulate == "netns" and reason is not None:
        raise RuntimeError(f"--emulate netns asked for, but {reason}")

    with Supervisor(out / "logs") as sup:
        if use_netns:
            link = EmulatedLink(LinkSpec(rate_gbit=opts.link_gbit, rtt_ms=opts.rtt_ms), b_in_root=True)
            link.start()
            sup.add_cleanup(link.stop)
            remote_host, local_host = link.addr_a, link.addr_b
            wrap = lambda argv: link.argv("a", argv)  # noqa: E731
            log(
                f"link: {opts.link_gbit:g} Gbit/s, {opts.rtt_ms:g} ms RTT between namespace {link.ns_a} "
                f"({remote_host}) and this host ({local_host})"
            )
            link_desc = {
                "rate_gbit": opts.link_gbit,
                "rtt_ms": opts.rtt_ms,
                "emulated": "netns+tbf+delay line",
                "delay_line_priority": link.forwarder_priority,
            }
        else:
            remote_host = local_host = "127.0.0.1"
            wrap = lambda argv: argv  # noqa: E731
            log(
                f"link: loopback (no namespaces: {reason or 'asked for loopback'}); the producer's pacing budget "
                f"holds its egress to {opts.link_gbit:g} Gbit/s, no delay emulated"
            )
            link_desc = {"rate_gbit": opts.link_gbit, "rtt_ms": 0.0, "emulated": "loopback + sender pacing"}
        p_port, l_port, rx_port, r_port = 8101, 8102, 15600, 8100
        # On loopback the link's rate comes from the transfer engine's pacing budget instead of tbf.
        producer_extra = {} if use_netns else {"pacing_gbps": opts.link_gbit}
        sup.start(
            "prfaas-prefill",
            wrap(_server(model_dir, "0.0.0.0", p_port, _ktc("kv_producer", **producer_extra))),
            env=_env(0),
        )
        sup.start(
            "local",
            _server(model_dir, "0.0.0.0", l_port, _ktc("kv_consumer", listen=f"0.0.0.0:{rx_port}")),
            env=_env(1),
        )
        remote_url, local_url = f"http://{remote_host}:{p_port}", f"http://127.0.0.1:{l_port}"
        log("starting two vLLM instances (60-120 s on this CPU machine) ...")
        sup.wait_healthy("prfaas-prefill", f"{remote_url}/health", opts.startup_timeout_s)
        sup.wait_healthy("local", f"{local_url}/health", opts.startup_timeout_s)
        startup = time.monotonic() - t_start
        log(f"both instances healthy after {startup:.0f} s; measuring prefill profiles ...")

        lengths = [64, 256, 768, 1600]
        t_remote = _prefill_profile(remote_url, count, lengths)
        t_local = _prefill_profile(local_url, count, lengths)
        kv = ModelKV.from_file(model_dir / "config.json")
        kv_mib = [kv.kv_bytes(n) / 2**20 for n in lengths]
        _planner_config(out / "planner.yaml", lengths, t_remote, t_local, kv_mib, opts.link_gbit, spec)
        threshold = (
            {
                "mode": "auto",
                "tokens": 256,
                "planner": str((out / "planner.yaml").resolve()),
                "min_samples": 4,
                "reoptimize_every_s": 2.0,
                "egress_window_s": 5.0,
            }
            if opts.threshold == "auto"
            else {"mode": "fixed", "tokens": float(opts.threshold)}
        )
        router_cfg = {
            "model": MODEL,
            "tokenizer": str(model_dir.resolve()),
            "block_size": 16,
            "link_gbps": opts.link_gbit,
            "threshold": threshold,
            "transfer_deadline_s": 60,
            "clusters": [
                {"name": "prfaas", "kind": "prfaas", "prefill": [{"url": remote_url}]},
                {
                    "name": "local",
                    "kind": "local",
                    "both": [{"url": local_url, "kv_endpoint": f"{local_host}:{rx_port}"}],
                },
            ],
        }
        (out / "router.yaml").write_text(yaml.safe_dump(router_cfg, sort_keys=False))
        log("calibrating the request path per route for the simulator (lone requests) ...")
        calibration = calibrate(
            sup, router_cfg, out, _env(1), lengths, opts.output_tokens, count, port=r_port - 2, log=log
        )
        sup.start(
            "router",
            [
                sys.executable,
                "-m",
                "prfaas_plugin",
                "router",
                "--config",
                str(out / "router.yaml"),
                "--host",
                "127.0.0.1",
                "--port",
                str(r_port),
                "--log-level",
                "warning",
            ],
            env=_env(1),
        )
        sup.wait_healthy("router", f"http://127.0.0.1:{r_port}/health", 120)

        records, texts, t0_wall = _drive(f"http://127.0.0.1:{r_port}", prompts, opts, log)
        wall = max((r.started_at_s + r.total_s for r in records), default=0.0)
        sup.check_alive()
        with httpx.Client(timeout=30) as c:
            admin = {
                x["request_id"]: x
                for x in c.get(f"http://127.0.0.1:{r_port}/admin/requests?limit=10000").json()["requests"]
            }
            timeline = c.get(f"http://127.0.0.1:{r_port}/admin/threshold").json()["timeline"]
        for r in records:
            a = admin.get(r.request_id, {})
            r.kv_bytes = int(a.get("kv_bytes") or 0)
            r.remote_prefill_s = a.get("prefill_s") if r.route == "prfaas" else None
            r.router = {k: a.get(k) for k in ROUTER_FIELDS}
            if a.get("fallback"):
                r.route = "fallback"
        log("re-running every prompt on the local instance alone (the single-instance reference) ...")
        with httpx.Client(timeout=300) as c:
            for r, p in zip(records, prompts):
                ref = c.post(
                    f"{local_url}/v1/completions",
                    json={"model": MODEL, "prompt": p.text, "temperature": 0, "max_tokens": opts.output_tokens},
                )
                ref.raise_for_status()
                r.output_equal = ref.json()["choices"][0]["text"] == texts[r.request_id]
    report = DemoReport(
        link=link_desc,
        requests=records,
        wall_s=wall,
        startup_s=startup,
        threshold_timeline=[(float(t), float(v)) for t, v, _ in timeline],
        threshold_reasons=[str(why) for _, _, why in timeline],
        calibration=calibration,
        workload_t0_wall=t0_wall,
    )
    return report


def _drive(
    router: str, prompts: list, opts: DemoOptions, log: Callable[[str], None]
) -> tuple[list[RequestRecord], dict[str, str], float]:
    """Send the workload through the router (streaming, ``opts.concurrency`` at a time); also
    returns the workload's start on the wall clock (the router's records' ``started_at`` is on it)."""
    from tqdm import tqdm

    # One HTTP client per sending thread, kept: building one (its SSL context) costs ~0.1 s of
    # CPU on this machine, which a client made per request would add to every measured TTFT.
    held = threading.local()
    clients: list[httpx.Client] = []

    def client() -> httpx.Client:
        if getattr(held, "c", None) is None:
            held.c = httpx.Client(timeout=300)
            clients.append(held.c)
        return held.c

    t0 = time.monotonic()
    t0_wall = time.time()

    def one(i: int) -> tuple[RequestRecord, str]:
        p = prompts[i]
        rid = f"demo-{i:03d}"
        c = client()
        start = time.monotonic() - t0
        a = stream_completion(c, router, MODEL, p.text, opts.output_tokens, rid)
        route = a.headers.get("x-prfaas-route", "?")
        l_unc = int(a.headers.get("x-prfaas-uncached-tokens", "0"))
        thr = float(a.headers.get("x-prfaas-threshold", "0"))
        return RequestRecord(rid, route, p.target_tokens, l_unc, thr, 0, None, a.ttft_s, a.total_s, start), a.text

    runs: list[tuple[RequestRecord, str]] = []
    with (
        concurrent.futures.ThreadPoolExecutor(opts.concurrency) as pool,
        tqdm(total=len(prompts), desc="requests", unit="req") as bar,
    ):
        futs = [pool.submit(one, i) for i in range(len(prompts))]
        for f in concurrent.futures.as_completed(futs):
            runs.append(f.result())
            bar.update(1)
    for c in clients:
        c.close()
    runs.sort(key=lambda r: r[0].request_id)
    log(f"workload done: {len(runs)} requests in {time.monotonic() - t0:.1f} s")
    return [r for r, _ in runs], {r.request_id: t for r, t in runs}, t0_wall
