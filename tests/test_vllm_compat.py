"""The connector against each supported vLLM release's real classes (``make test`` runs this file once
per release: 0.32 in the main venv, 0.33 and 0.34 in ``.venv-vllm-compat`` with that release's wheel
first on ``sys.path``; see the Makefile).

Checked without a GPU: every abstract method of that release's ``KVConnectorBase_V1`` is implemented
with the same parameters, and the scheduler half is driven through that release's real
``Scheduler`` (built the way vLLM's ``tests/v1/kv_connector/unit/utils.py`` builds one) for a
request that loads remotely, one whose load fails and is recomputed, an abort mid-load, the
producer's N-1 backoff, and the in-engine offload decision (``offload``) with a failed remote prefill. The worker half needs a running model and is covered on 0.32 only
(``test_vllm_pd.py``, real servers on CPU): vLLM 0.33/0.34 ship no CPU build.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from pathlib import Path

import pytest

#: the release this run must see; set by the Makefile so a wrong path cannot pass as a run (0.32 runs
#: in the main venv, 0.33 and 0.34 in .venv-vllm-compat)
EXPECTED = os.environ.get("PRFAAS_VLLM_COMPAT_VERSION")

pytestmark = [
    pytest.mark.vllm_compat,
    pytest.mark.skipif(not EXPECTED, reason="own tier: `make test-vllm-compat` (part of `make test`)"),
]

BLOCK = 16
NUM_BLOCKS = 64


def test_the_expected_vllm_release_is_the_one_imported():
    import vllm.version

    assert vllm.version.__version__ == EXPECTED, vllm.version.__file__
    from prfaas_plugin.engines.vllm import compat

    assert compat.unsupported_reason(vllm.version.__version__) is None


def test_every_abstract_method_is_implemented_with_vllms_parameters():
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, SupportsHMA

    from prfaas_plugin.engines.vllm.connector import PrfaaSConnector

    assert not inspect.isabstract(PrfaaSConnector), PrfaaSConnector.__abstractmethods__
    abstract = {n for base in (KVConnectorBase_V1, SupportsHMA) for n in base.__abstractmethods__}
    overridden = {n for n in vars(PrfaaSConnector) if callable(getattr(PrfaaSConnector, n, None))}
    for name in sorted(abstract | (overridden & set(dir(KVConnectorBase_V1)))):
        ours = inspect.signature(getattr(PrfaaSConnector, name))
        theirs = inspect.signature(getattr(KVConnectorBase_V1, name, None) or getattr(SupportsHMA, name))
        assert list(ours.parameters) == list(theirs.parameters), f"{name}: ours {ours}, vLLM's {theirs}"


def test_hooks_of_this_release_answer_as_documented():
    from vllm.config import KVTransferConfig

    from prfaas_plugin.engines.vllm.connector import PrfaaSConnector

    ktc = KVTransferConfig(kv_connector="PrfaaSConnector", kv_role="kv_consumer")
    assert PrfaaSConnector.supports_sleep_mode(ktc) is False
    assert PrfaaSConnector.supports_lookahead_block_hashes(ktc) is False
    try:
        from vllm.config.kv_transfer import KVCacheAccess
    except ImportError:  # before 0.34: the hook does not exist
        assert PrfaaSConnector.kv_cache_access(ktc) is None
    else:
        assert PrfaaSConnector.kv_cache_access(ktc) == KVCacheAccess.IN_PROCESS


# ---------------------------------------------------------------- the real Scheduler


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny-llama")
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "vocab_size": 512,
        "max_position_embeddings": 1024,
        "torch_dtype": "float32",
    }
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def make_scheduler(model_dir: Path, role: str, extra: dict | None = None, budget: int = 1024, **sched_kw):
    import torch
    from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    model = ModelConfig(model=str(model_dir), skip_tokenizer_init=True, max_model_len=1024, dtype="float32")
    vcfg = VllmConfig(
        model_config=model,
        scheduler_config=SchedulerConfig(
            max_num_seqs=8,
            max_num_batched_tokens=budget,
            max_model_len=1024,
            is_encoder_decoder=False,
            **sched_kw,
        ),
        cache_config=CacheConfig(block_size=BLOCK, gpu_memory_utilization=0.9, cache_dtype="auto"),
        kv_transfer_config=KVTransferConfig(
            kv_connector="PrfaaSConnector",
            kv_connector_module_path="prfaas_plugin.engines.vllm.connector",
            kv_role=role,
            kv_connector_extra_config=extra or {},
        ),
        device_config=DeviceConfig("cpu"),
    )
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=16, dtype=torch.float32)
    kvc = KVCacheConfig(
        num_blocks=NUM_BLOCKS,
        kv_cache_tensors=[],  # the scheduler never reads them (their fields differ by release)
        kv_cache_groups=[KVCacheGroupSpec(["layers.0", "layers.1"], spec)],
    )
    if hasattr(kvc, "hash_block_size"):  # 0.32 and 0.34; EngineCore fills it in
        kvc.hash_block_size = BLOCK
    vcfg.cache_config.num_gpu_blocks = NUM_BLOCKS
    return Scheduler(
        vllm_config=vcfg,
        kv_cache_config=kvc,
        structured_output_manager=StructuredOutputManager(vcfg),
        block_size=BLOCK,
        log_stats=True,
    )


def make_request(rid: str, n_prompt: int, params: dict | None, first: int = 3):
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    sp = SamplingParams(max_tokens=4, ignore_eos=True)
    sp.extra_args = {"kv_transfer_params": params} if params is not None else None
    return Request(
        request_id=rid,
        prompt_token_ids=[(7 * i + first) % 500 for i in range(n_prompt)],
        sampling_params=sp,
        pooling_params=None,
        block_hasher=get_request_block_hasher(BLOCK, sha256),
    )


def consumer_params(tid: str) -> dict:
    return {"prfaas_version": 1, "role": "consumer", "transfer_id": tid, "token": f"token-{tid}-0123456789abcdef"}


def runner_output(sched_out, sampled: dict[str, list[int]], **kv):
    """A ModelRunnerOutput for ``sched_out``: the field set differs by release (0.34 dropped
    ``req_id_to_index``), so only the fields this release declares are passed."""
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

    req_ids = list(sched_out.num_scheduled_tokens)
    fields = {f.name for f in dataclasses.fields(ModelRunnerOutput)}
    args = {"req_ids": req_ids, "sampled_token_ids": [sampled.get(r, []) for r in req_ids]}
    if "req_id_to_index" in fields:
        args["req_id_to_index"] = {r: i for i, r in enumerate(req_ids)}
    if kv:
        args["kv_connector_output"] = KVConnectorOutput(**kv)
    return ModelRunnerOutput(**args)


def free_blocks(sched) -> int:
    return sched.kv_cache_manager.block_pool.get_num_free_blocks()


def test_remote_load_then_the_last_prompt_token_is_computed_locally(model_dir):
    from vllm.v1.request import RequestStatus

    s = make_scheduler(model_dir, "kv_consumer")
    free0 = free_blocks(s)
    req = make_request("a", 40, consumer_params("x1"))
    s.add_request(req)
    out = s.schedule()
    assert req.status == RequestStatus.WAITING_FOR_REMOTE_KVS and not out.num_scheduled_tokens
    (load,) = out.kv_connector_metadata.loads
    assert load.num_tokens == 39 and load.transfer_id == "x1" and len(load.block_ids[0]) == 3
    s.update_from_output(out, runner_output(out, {}, finished_recving={"a"}))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 1}  # N-1 came over the wire, token N here
    assert not out.kv_connector_metadata.loads
    s.update_from_output(out, runner_output(out, {"a": [11]}))
    assert req.num_computed_tokens == 40 and list(req.output_token_ids) == [11]
    s.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert free_blocks(s) == free0
    assert not s.connector._sched._params and not s.connector._sched._loaded


def test_failed_load_is_recomputed_from_scratch(model_dir):
    from vllm.v1.request import RequestStatus

    s = make_scheduler(model_dir, "kv_consumer")
    req = make_request("b", 40, consumer_params("x2"))
    s.add_request(req)
    out = s.schedule()
    (load,) = out.kv_connector_metadata.loads
    bad = set(load.block_ids[0])
    s.update_from_output(out, runner_output(out, {}, finished_recving={"b"}, invalid_block_ids=bad))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"b": 40}, "a failed load must recompute the whole prompt"
    assert not out.kv_connector_metadata.loads, "the connector must not retry the load"
    s.update_from_output(out, runner_output(out, {"b": [5]}))
    assert req.status == RequestStatus.RUNNING and list(req.output_token_ids) == [5]


def test_abort_mid_load_frees_everything_once_the_load_reports(model_dir):
    from vllm.v1.request import RequestStatus

    s = make_scheduler(model_dir, "kv_consumer")
    free0 = free_blocks(s)
    req = make_request("c", 40, consumer_params("x3"))
    s.add_request(req)
    out = s.schedule()
    assert req.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    held = free0 - free_blocks(s)
    assert held == 3
    s.finish_requests("c", RequestStatus.FINISHED_ABORTED)
    assert free0 - free_blocks(s) == held, "blocks freed while the worker may still be writing into them"
    out = s.schedule()
    s.update_from_output(out, runner_output(out, {}, finished_recving={"c"}))
    out = s.schedule()
    s.update_from_output(out, runner_output(out, {}))
    assert "c" not in s.requests
    assert free_blocks(s) == free0
    side = s.connector._sched
    assert not side._params and not side._loaded and not side._pending_loads


def test_producer_prefills_n_minus_1_and_ships_it(model_dir):
    s = make_scheduler(model_dir, "kv_producer")
    params = {
        "prfaas_version": 1,
        "role": "producer",
        "transfer_id": "p1",
        "token": "tp1" * 8,
        "decode_endpoint": "127.0.0.1:9",
    }
    req = make_request("p", 48, params)  # 3 full blocks: the cut invalidates the last block hash
    assert len(req.block_hashes) == 3
    s.add_request(req)
    assert req.num_prompt_tokens == 47 and len(req.prompt_token_ids) == 47 and req.num_tokens == 47
    if hasattr(s.kv_cache_config, "hash_block_size"):  # 0.33 has no such field (nor does NIXL trim there)
        assert len(req.block_hashes) == 2
    out = s.schedule()
    assert out.num_scheduled_tokens == {"p": 47}
    (send,) = out.kv_connector_metadata.sends
    assert send.num_tokens == 47 and send.endpoint == "127.0.0.1:9"


def test_consumer_loads_count_against_the_inflight_limit(model_dir):
    """0.34's --max-num-inflight-kv-loads governs PrfaaS loads through ``may_load_async``."""
    from vllm.config import SchedulerConfig

    if "max_num_inflight_kv_loads" not in {f.name for f in dataclasses.fields(SchedulerConfig)}:
        pytest.skip("this vLLM release has no --max-num-inflight-kv-loads (added in 0.34)")
    s = make_scheduler(model_dir, "kv_consumer", max_num_inflight_kv_loads=1)
    for rid in ("d1", "d2"):
        s.add_request(make_request(rid, 40, consumer_params("t" + rid)))
    assert len(s.async_kv_waiting) == 2 and not len(s.waiting)
    out = s.schedule()
    assert [t.req_id for t in out.kv_connector_metadata.loads] == ["d1"], "the limit of 1 was not applied"
    s.add_request(make_request("plain", 8, None))
    assert s.connector.may_load_async(s.requests["plain"]) is False


def test_in_engine_offload_through_the_real_scheduler(model_dir):
    """The ``offload`` option: the decision sees this release's exact prefix hit; a local request
    is scheduled at once, an offloaded one waits for its KV, and a failed remote prefill (here an
    unreachable PrfaaS instance) stops the load so the request is recomputed locally."""
    import time

    from vllm.v1.request import RequestStatus

    from prfaas_plugin.demo.ports import free_port

    offload = {
        "prefill_urls": [f"http://127.0.0.1:{free_port()}"],  # nobody listens
        "kv_endpoint": "127.0.0.1:15600",
        "threshold_tokens": 30,
        "load_scrape_s": 0,
    }
    s = make_scheduler(model_dir, "kv_consumer", extra={"offload": offload})
    side = s.connector._sched

    def last_decision() -> list:
        """This step's decision, read before update_from_output hands the stats to vLLM."""
        return side.stats.data["offload_decisions"][-1][:3]

    try:
        free0 = free_blocks(s)
        # 24 tokens, cold: local; its first block enters the prefix cache
        w = make_request("w", 24, None)
        s.add_request(w)
        out = s.schedule()
        assert out.num_scheduled_tokens == {"w": 24}
        assert last_decision() == ["local", "within_threshold", 24]
        s.update_from_output(out, runner_output(out, {"w": [1]}))
        s.finish_requests("w", RequestStatus.FINISHED_ABORTED)
        # 40 tokens sharing that block: 16 cached, 24 uncached <= 30: local, only the rest computed
        x = make_request("x", 40, None)
        s.add_request(x)
        out = s.schedule()
        assert out.num_scheduled_tokens == {"x": 24}
        assert last_decision() == ["local", "within_threshold", 24]  # the exact hit: 40 - 16
        s.update_from_output(out, runner_output(out, {"x": [2]}))
        s.finish_requests("x", RequestStatus.FINISHED_ABORTED)
        # 40 cold tokens: offloaded, waits for its KV
        lreq = make_request("l", 40, None, first=5)
        s.add_request(lreq)
        out = s.schedule()
        assert lreq.status == RequestStatus.WAITING_FOR_REMOTE_KVS and not out.num_scheduled_tokens
        (load,) = out.kv_connector_metadata.loads
        assert load.num_tokens == 39 and load.num_local_tokens == 0
        assert last_decision() == ["offload", "above_threshold", 40]
        # the failure (nobody listens) may come back while this step is still being scheduled: then
        # the abort rides in the same metadata as the load (the worker starts loads before aborts)
        aborts = list(out.kv_connector_metadata.aborts)
        deadline = time.monotonic() + 10
        while not aborts and not side.offload.failed and time.monotonic() < deadline:
            time.sleep(0.01)
        s.update_from_output(out, runner_output(out, {}))
        out = s.schedule()
        aborts += out.kv_connector_metadata.aborts
        assert aborts == ["l"], "the load of a failed offload was not stopped (or stopped twice)"
        # the worker aborts the receive and reports the load failed: vLLM recomputes the prompt
        bad = set(load.block_ids[0])
        s.update_from_output(out, runner_output(out, {}, finished_recving={"l"}, invalid_block_ids=bad))
        out = s.schedule()
        assert out.num_scheduled_tokens == {"l": 40}
        s.update_from_output(out, runner_output(out, {"l": [3]}))
        assert lreq.status == RequestStatus.RUNNING and list(lreq.output_token_ids) == [3]
        s.finish_requests("l", RequestStatus.FINISHED_ABORTED)
        assert free_blocks(s) == free0, "blocks leaked"
    finally:
        side.shutdown()
