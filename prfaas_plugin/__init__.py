"""prfaas-plugin: Prefill-as-a-Service for vLLM and SGLang.

Layers (each a subpackage, engine adapters kept thin over an engine-agnostic core):

- ``prfaas_plugin.kvsize``    KV-cache size model read from Hugging Face configs.
- ``prfaas_plugin.planner``   the paper's throughput model (Eqs. 1-8) and threshold search.
- ``prfaas_plugin.transfer``  the cross-datacenter KV transfer engine (gRPC control, TCP data).
- ``prfaas_plugin.kernels``   pack/unpack of paged hybrid caches (Triton on GPU, torch on CPU);
                              the source lives in the repository's top-level ``kernels/`` folder.
- ``prfaas_plugin.router``    the OpenAI-compatible global scheduler.
- ``prfaas_plugin.engines``   vLLM connector and SGLang transfer backend.
"""

from __future__ import annotations

from pathlib import Path as _Path

__version__ = "0.1.0"

# In a source checkout (tests, benches, helpers working from a git worktree on PYTHONPATH) the
# top-level kernels/ folder is not under prfaas_plugin/; an installed wheel maps it there through
# setuptools' package-dir. Point the subpackage search at it so both cases import the same code.
_source_kernels = _Path(__file__).resolve().parent.parent / "kernels"
if (_source_kernels / "__init__.py").is_file() and not (_Path(__file__).parent / "kernels").exists():
    import importlib.util as _ilu
    import sys as _sys

    if "prfaas_plugin.kernels" not in _sys.modules:
        _spec = _ilu.spec_from_file_location(
            "prfaas_plugin.kernels",
            _source_kernels / "__init__.py",
            submodule_search_locations=[str(_source_kernels)],
        )
        if _spec is not None and _spec.loader is not None:
            _mod = _ilu.module_from_spec(_spec)
            _sys.modules["prfaas_plugin.kernels"] = _mod
            _spec.loader.exec_module(_mod)
