"""Applying the long-term loop's P/D split to SGLang instances at run time (opt-in).

The threshold controller's re-optimisation recommends how many of the local cluster's instances
should prefill and how many decode (paper section 3.4.3, long-term loop). SGLang can flip an
idle instance's role (``POST /pd_role_switch``, servers started with ``--enable-pd-role-switch``;
the prfaas transfer backend supports it). This moves the local pool toward the advice one
instance at a time: take the least-loaded instance of the surplus role out of routing, wait for
its requests to finish, ask it to switch, and put it back in its new role. A cool-down between
switches is the hysteresis that keeps a noisy advice from flapping roles. vLLM has no run-time
role switch, so the config refuses ``apply_split`` there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Literal

from prfaas_plugin.fleet.prefix_index import PrefixIndex
from prfaas_plugin.router.instances import Fleet, Instance
from prfaas_plugin.router.threshold import SplitAdvice
from prfaas_plugin.router.upstream import Upstream, UpstreamError

log = logging.getLogger("prfaas.router")


@dataclass
class SwitchPlan:
    instance: Instance
    new_role: Literal["prefill", "decode"]


def plan_switch(advice: SplitAdvice, fleet: Fleet) -> SwitchPlan | None:
    """The one instance to flip toward ``advice``, or None (already there, or not applicable).

    Only the local cluster's dedicated prefill and decode instances count ("both" instances
    are neither); the advice is applied only when its total matches theirs, and the last
    instance of a role is never taken."""
    local = [i for i in fleet.of_kind("local") if i.healthy and i.role in ("prefill", "decode")]
    prefill = [i for i in local if i.role == "prefill"]
    decode = [i for i in local if i.role == "decode"]
    if advice.n_prefill + advice.n_decode != len(local):
        return None
    if advice.n_prefill > len(prefill) and len(decode) > 1:
        return SwitchPlan(min(decode, key=lambda i: (i.inflight, i.url)), "prefill")
    if advice.n_decode > len(decode) and len(prefill) > 1:
        return SwitchPlan(min(prefill, key=lambda i: (i.inflight, i.url)), "decode")
    return None


class SplitApplier:
    def __init__(
        self, client: Upstream, index: PrefixIndex, cooldown_s: float, drain_timeout_s: float, switch_timeout_s: float
    ) -> None:
        self.client = client
        self.index = index
        self.cooldown_s = cooldown_s
        self.drain_timeout_s = drain_timeout_s
        self.switch_timeout_s = switch_timeout_s
        self.last_switch = -float("inf")
        self.history: list[dict] = []

    def due(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) - self.last_switch >= self.cooldown_s

    async def apply(self, advice: SplitAdvice, fleet: Fleet) -> str | None:
        """One step toward ``advice``; returns the outcome ("switched", "refused", "drain
        timeout", "failed") when it tried, None when there was nothing to do."""
        if not self.due():
            return None
        plan = plan_switch(advice, fleet)
        if plan is None:
            return None
        self.last_switch = time.monotonic()
        inst, new_role = plan.instance, plan.new_role
        old_role = inst.role
        inst.draining = True
        try:
            outcome, detail = await self._drain_and_switch(inst, new_role)
        finally:
            inst.draining = False
        if outcome == "switched":
            inst.role = new_role
            # SGLang resets the instance's radix cache on a switch: its prefixes are gone.
            self.index.clear_instance(inst.url)
        record = {
            "url": inst.url,
            "from": old_role,
            "to": new_role,
            "outcome": outcome,
            "detail": detail,
            "advice": {"n_prefill": advice.n_prefill, "n_decode": advice.n_decode},
        }
        self.history.append(record)
        del self.history[:-100]
        level = logging.INFO if outcome == "switched" else logging.WARNING
        log.log(
            level,
            "role switch %s %s -> %s: %s%s",
            inst.url,
            old_role,
            new_role,
            outcome,
            f" ({detail})" if detail else "",
        )
        return outcome

    async def _drain_and_switch(self, inst: Instance, new_role: str) -> tuple[str, str]:
        deadline = time.monotonic() + self.drain_timeout_s
        while inst.inflight > 0:
            if time.monotonic() > deadline:
                return "drain timeout", f"{inst.inflight} requests still open after {self.drain_timeout_s:g} s"
            await asyncio.sleep(0.05)
        try:
            status, parsed, text = await self.client.post_json(
                f"{inst.url}/pd_role_switch", {"new_role": new_role}, self.switch_timeout_s
            )
        except UpstreamError as exc:
            return "failed", str(exc)
        if status == 200 and isinstance(parsed, dict) and parsed.get("success"):
            return "switched", str(parsed.get("message", ""))
        message = parsed.get("message") if isinstance(parsed, dict) else text[:200]
        return "refused", f"HTTP {status}: {message}"
