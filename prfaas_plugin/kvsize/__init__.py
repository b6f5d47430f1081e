"""KV-cache size model: how many bytes a prefill of l uncached tokens hands to decode."""

from prfaas_plugin.kvsize.layers import LayerCache, LayerKind
from prfaas_plugin.kvsize.model import MIB, ModelKV
from prfaas_plugin.kvsize.parse import ConfigError, parse_layers

__all__ = ["ConfigError", "LayerCache", "LayerKind", "MIB", "ModelKV", "parse_layers"]
