"""Fault injection for the KV path: a TCP proxy that can reset, stall, throttle or corrupt."""

from prfaas_plugin.faults.proxy import FaultKind, FaultPlan, FaultProxy

__all__ = ["FaultKind", "FaultPlan", "FaultProxy"]
