"""prfaas-plugin: Prefill-as-a-Service for vLLM and SGLang.

Layers (each a subpackage, engine adapters kept thin over an engine-agnostic core;
docs/architecture.md draws them):

- ``prfaas_plugin.protocol``  the contracts between processes: request protocol, transfer
                              service identity, metric names.
- ``prfaas_plugin.kvsize``    KV-cache size model read from Hugging Face configs.
- ``prfaas_plugin.planner``   the paper's throughput model (Eqs. 1-8) and threshold search.
- ``prfaas_plugin.transfer``  the cross-datacenter KV transfer engine (gRPC control, TCP data).
- ``prfaas_plugin.kernels``   pack/unpack of paged hybrid caches (Triton on GPU, torch on CPU).
- ``prfaas_plugin.router``    the OpenAI-compatible global scheduler.
- ``prfaas_plugin.engines``   vLLM connector and SGLang transfer backend.
"""

from __future__ import annotations

__version__ = "0.1.0"
