"""Engine adapters: the vLLM KV connector and the SGLang transfer backend."""
