"""`vllm serve --kv-connector NAME --kv-role ROLE` shorthand for vLLM's ``--kv-transfer-config``.

vLLM gives plugins no way to add command-line flags: ``vllm.general_plugins`` entry points are
called (with no arguments) while the serve parser is being built, never see the parser, and there
is no hook between building and parsing. The shorthand therefore ships as a small, hash-checked
patch to vLLM's parser builder (``patches/`` at the repository root), applied and removed by
``prfaas vllm-cli install|uninstall``:

- :mod:`.sugar` is what the patched parser calls: it adds the flags and expands them;
- :mod:`.patchfile` reads a patch file (documented header + unified diff) and applies it strictly;
- :mod:`.target` finds the installed vLLM and decides whether a patch may touch it.
"""
