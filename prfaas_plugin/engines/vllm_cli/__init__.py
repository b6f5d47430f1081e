"""`vllm serve --kv-connector NAME --kv-role ROLE` shorthand for vLLM's ``--kv-transfer-config``.

vLLM builds and parses its serve command line before any ``vllm.general_plugins`` entry point
runs, so a plugin cannot add flags to it. The shorthand therefore ships as a small, hash-checked
patch to vLLM's parser builder (``patches/`` at the repository root), applied and removed by
``prfaas vllm-cli install|uninstall``:

- :mod:`.sugar` is what the patched parser calls: it adds the flags and expands them;
- :mod:`.patchfile` reads a patch file (documented header + unified diff) and applies it strictly;
- :mod:`.target` finds the installed vLLM and decides whether a patch may touch it.
"""
