"""The ``prfaas`` SGLang disaggregation transfer backend.

``plugin`` (imported by SGLang's entry point, light) registers the backend; ``conn`` holds the
SGLang classes and is imported only when SGLang asks for them; ``memory``, ``wire`` and
``config`` have no SGLang dependency.
"""
