"""``PrfaaSConnector``: vLLM V1 KV connector pushing prefill KV to decode over the PrfaaS
transfer engine. A thin shell: the scheduler half and the worker half live in their own modules
because vLLM builds this class once per role, in different processes. What differs between the
supported vLLM releases lives in ``compat``; importing this module under any other release fails
with one line (``compat.UnsupportedVLLM``)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)

from prfaas_plugin.engines.vllm import compat
from prfaas_plugin.engines.vllm.meta import PrfaaSMetadata
from prfaas_plugin.engines.vllm.options import Options

if TYPE_CHECKING:
    from prfaas_plugin.engines.vllm.scheduler import SchedulerSide
    from prfaas_plugin.engines.vllm.worker import WorkerSide

compat.require_supported_vllm()

log = logging.getLogger("vllm.prfaas")  # child of vLLM's logger: same handlers and format


class PrfaaSConnector(KVConnectorBase_V1, SupportsHMA):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        ktc = vllm_config.kv_transfer_config
        self.opts = Options.from_extra(ktc.kv_connector_extra_config)
        self._sched: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            from prfaas_plugin.engines.vllm.scheduler import SchedulerSide

            # vLLM reads the policy right after building the connector: apply ours (recompute)
            ktc.kv_load_failure_policy = self.opts.kv_load_failure_policy
            self._sched = SchedulerSide(vllm_config, kv_cache_config, self.opts)
        else:
            from prfaas_plugin.engines.vllm.worker import WorkerSide

            self._worker = WorkerSide(
                vllm_config, kv_cache_config, self.opts, producer=ktc.is_kv_producer, consumer=ktc.is_kv_consumer
            )

    @property
    def sched(self) -> SchedulerSide:
        """The scheduler half; vLLM calls scheduler methods only on the SCHEDULER-role instance."""
        if self._sched is None:
            raise RuntimeError("PrfaaSConnector: a scheduler-side method was called on the worker-role connector")
        return self._sched

    @property
    def worker(self) -> WorkerSide:
        """The worker half; vLLM calls worker methods only on the WORKER-role instance."""
        if self._worker is None:
            raise RuntimeError("PrfaaSConnector: a worker-side method was called on the scheduler-role connector")
        return self._worker

    # ---------------- scheduler side ----------------
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.sched.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self.sched.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> Any:
        return self.sched.build_connector_meta(scheduler_output)

    def on_new_request(self, request: Any) -> None:
        self.sched.on_new_request(request)

    def may_load_async(self, request: Any) -> bool:
        return self.sched.may_load_async(request)

    @classmethod
    def supports_lookahead_block_hashes(cls, kv_transfer_config: Any) -> bool:
        """False: PrfaaS never looks KV up by block hash (what a consumer loads is named by the
        request's params, and a producer ships what it computed), so core lookahead hashing would
        cost hashing work and buy nothing."""
        return False

    @classmethod
    def kv_cache_access(cls, kv_transfer_config: Any) -> Any:
        """In-process: the worker half copies blocks between the KV tensors and its own staging
        buffers in the worker process and moves bytes over TCP; it never registers the device KV
        cache with a NIC, so the single-allocation constraint of ``REGISTERS`` does not apply."""
        return compat.in_process_kv_access()

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: Any) -> bool:
        """False (vLLM 0.33+ defaults to True). The worker half keeps views of the KV tensors it
        was given, per-request staging state and open transfer streams across steps; sleep mode
        remaps the KV cache under them, and releasing and re-taking all of that in
        ``unregister_kv_caches`` / ``restore_kv_caches`` is not implemented. Sleep mode also needs
        CUDA's memory pool, so no test on the CPU machines this project builds on could prove it.
        vLLM therefore refuses ``--enable-sleep-mode`` with this connector instead of letting a
        transfer touch remapped memory."""
        return False

    def bind_kv_cache_manager(self, kv_cache_manager: Any) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        self.sched.bind_kv_cache_manager(kv_cache_manager)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict | None]:
        return self.sched.request_finished(request, (block_ids,))

    def request_finished_all_groups(self, request: Any, block_ids: tuple[list[int], ...]) -> tuple[bool, dict | None]:
        return self.sched.request_finished(request, block_ids)

    def get_loaded_kv_cache_group_ids(self, request: Any) -> Any:
        return list(range(len(self.sched.groups)))

    # ---------------- worker side ----------------
    def _step_meta(self) -> PrfaaSMetadata:
        """This step's plan, as build_connector_meta made it on the scheduler side."""
        meta = self._get_connector_metadata()
        if not isinstance(meta, PrfaaSMetadata):
            raise TypeError(f"PrfaaSConnector: step metadata is {type(meta).__name__}, not PrfaaSMetadata")
        return meta

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self.worker.meta = self._step_meta()
        self.worker.start_load_kv()

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads complete before the request is scheduled (async load)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        self.worker.meta = self._step_meta()
        self.worker.save_kv_layer(layer_name)

    def wait_for_save(self) -> None:
        self.worker.meta = self._step_meta()
        self.worker.wait_for_save()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        s, r, _ = self.worker.transfer_results(finished_req_ids)
        return s or None, r or None

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        s, r, f = self.worker.transfer_results(finished_req_ids)
        return KVConnectorTransferResults(finished_sending=s, finished_recving=r, failed_recving=f)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.load_errors()

    # ---------------- telemetry (worker -> scheduler -> API server's /metrics) ----------------
    def get_kv_connector_stats(self) -> Any:
        """The worker's transfers, or on the scheduler side its offload decisions (vLLM merges
        both into one stats object per step)."""
        if self._worker is not None:
            return self._worker.take_stats()
        return self._sched.take_stats() if self._sched is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> Any:
        from prfaas_plugin.engines.vllm.stats import PrfaaSConnectorStats

        return PrfaaSConnectorStats(data=data) if data is not None else PrfaaSConnectorStats()

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: Any,
        metric_types: dict,
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> Any:
        from prfaas_plugin.engines.vllm.stats import PrfaaSPromMetrics

        return PrfaaSPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._sched is not None:
            self._sched.shutdown()


#: ``kv_connector_module_path`` looks the class up by the ``kv_connector`` name: accept both.
prfaas = PrfaaSConnector
