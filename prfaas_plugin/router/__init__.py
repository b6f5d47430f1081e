"""The PrfaaS global router: OpenAI-compatible front, threshold/bandwidth/cache-aware placement."""
