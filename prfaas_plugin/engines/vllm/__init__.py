"""The ``prfaas`` KV connector for vLLM V1 (see docs/vllm.md).

Import cost matters: vLLM loads this package in every process, so nothing heavy is imported here."""
