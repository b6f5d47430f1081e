"""A model's KV cost as a whole: S_kv(l), bytes per token, fixed bytes per request, Phi_kv."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prfaas_plugin.kvsize.layers import LayerCache, LayerKind
from prfaas_plugin.kvsize.parse import ConfigError, parse_layers
from prfaas_plugin.yamlconfig import loads_finite_json, read_text

MIB = 1 << 20


@dataclass(frozen=True)
class ModelKV:
    name: str
    family: str
    layers: tuple[LayerCache, ...]

    @classmethod
    def from_config(
        cls, cfg: Mapping[str, Any], name: str = "", kv_dtype: str | None = None, state_dtype: str | None = None
    ) -> ModelKV:
        family, layers = parse_layers(cfg, kv_dtype=kv_dtype, state_dtype=state_dtype)
        return cls(name or str((cfg.get("architectures") or ["model"])[0]), family, tuple(layers))

    @classmethod
    def from_file(cls, path: str | Path, **kw: Any) -> ModelKV:
        p = Path(path)
        text = read_text(p, ConfigError)
        try:
            cfg = loads_finite_json(text)
        except RecursionError:
            raise ConfigError(f"{p}: not valid JSON (nested too deeply)") from None
        except ValueError as exc:  # JSONDecodeError, NaN/Infinity, an integer of thousands of digits
            raise ConfigError(f"{p}: not valid JSON ({str(exc).splitlines()[0]})") from None
        try:
            return cls.from_config(cfg, name=p.stem, **kw)
        except ValueError as exc:  # ConfigError, or an unknown dtype name
            raise ConfigError(f"{p}: {exc}") from None

    # -- the numbers ------------------------------------------------------------------------
    @property
    def token_bytes(self) -> int:
        """Bytes per cached token of the length-proportional layers (full attention, MLA)."""
        return sum(layer.token_bytes for layer in self.layers if layer.kind in (LayerKind.FULL, LayerKind.MLA))

    @property
    def state_bytes(self) -> int:
        """Fixed bytes per request of the recurrent layers (state + conv)."""
        return sum(layer.state_bytes + layer.conv_bytes for layer in self.layers if layer.kind is LayerKind.LINEAR)

    @property
    def window_bytes(self) -> int:
        """Bytes of the sliding-window layers once the prompt fills their windows."""
        return sum(layer.token_bytes * (layer.window or 0) for layer in self.layers if layer.kind is LayerKind.SLIDING)

    @property
    def fixed_bytes(self) -> int:
        """Request-level bytes that do not grow with length (for prompts at least one window long)."""
        return self.state_bytes + self.window_bytes

    def kv_bytes(self, tokens: int) -> int:
        """S_kv(l): bytes that cross the wire for ``tokens`` uncached prompt tokens."""
        return sum(layer.bytes_for(tokens) for layer in self.layers)

    def phi_kv_gbps(self, tokens: int, prefill_tokens_per_s: float) -> float:
        """Eq. 1, Phi_kv = S_kv(l) / T_prefill(l), with T_prefill = l / prefill rate (Gbit/s, 1e9)."""
        if not 0 < prefill_tokens_per_s < math.inf:
            raise ValueError(f"prefill_tokens_per_s must be finite and > 0, got {prefill_tokens_per_s}")
        return self.kv_bytes(tokens) * 8 / (tokens / prefill_tokens_per_s) / 1e9

    def composition(self) -> dict[str, int]:
        return dict(Counter(f"{layer.kind.value}:{layer.family}" for layer in self.layers))

    def summary(self, lengths: list[int], prefill_tokens_per_s: float | None = None) -> dict[str, Any]:
        rows = []
        for n in lengths:
            row: dict[str, Any] = {
                "tokens": n,
                "kv_bytes": self.kv_bytes(n),
                "kv_mib": round(self.kv_bytes(n) / MIB, 3),
            }
            if prefill_tokens_per_s:
                row["phi_kv_gbps"] = round(self.phi_kv_gbps(n, prefill_tokens_per_s), 4)
            rows.append(row)
        return {
            "model": self.name,
            "family": self.family,
            "layers": self.composition(),
            "bytes_per_token": self.token_bytes,
            "fixed_bytes_per_request": self.fixed_bytes,
            "state_bytes_per_request": self.state_bytes,
            "window_bytes_per_request": self.window_bytes,
            "lengths": rows,
        }
