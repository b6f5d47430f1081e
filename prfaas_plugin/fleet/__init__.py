"""What is known about the engine instances of a fleet, shared by everything that places requests:
the router, a vLLM instance deciding its own offloads (``engines/vllm/offload.py``) and the
simulator. ``prefix_index``: which instance holds which prompt prefix (block-hash chains fed by
KV events or by what was sent there). ``engine_metrics``: an engine's queue and counters read
from its Prometheus text."""
