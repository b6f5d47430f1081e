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

# In a source checkout (tests, benches, a git worktree on PYTHONPATH) the top-level kernels/
# folder is not under prfaas_plugin/; an installed wheel maps it there through setuptools'
# package-dir. A finder resolves ``prfaas_plugin.kernels`` to the source folder *when it is
# imported* (importing it eagerly would pull torch into every ``import prfaas_plugin``).
_source_kernels = _Path(__file__).resolve().parent.parent / "kernels"
if (_source_kernels / "__init__.py").is_file() and not (_Path(__file__).parent / "kernels").exists():
    import importlib.abc as _abc
    import importlib.util as _ilu
    import sys as _sys

    class _SourceKernelsFinder(_abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
            if fullname != "prfaas_plugin.kernels":
                return None
            return _ilu.spec_from_file_location(
                fullname, _source_kernels / "__init__.py", submodule_search_locations=[str(_source_kernels)]
            )

    if not any(type(f).__name__ == "_SourceKernelsFinder" for f in _sys.meta_path):
        _sys.meta_path.insert(0, _SourceKernelsFinder())
