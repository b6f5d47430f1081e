"""The demo's workload: prompt lengths from the paper's truncated log-normal, scaled to a tiny
model's context, with some prompts extending earlier ones (so prefix caches matter)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

# Word list for prompt text; any text works (random weights), but words keep prompts readable.
_WORDS = (
    "prefill decode cache layer token stream link cluster request router threshold bandwidth "
    "latency state window block page egress ingress model kernel tensor buffer socket queue "
    "schedule offload remote local compute memory network transfer batch length prefix hybrid"
).split()


@dataclass(frozen=True)
class WorkloadSpec:
    """Paper case study: mu=9.90, sigma=1.00 on [128, 128K]. ``scale`` shrinks lengths to fit a
    tiny model (mu + ln(scale)); everything else keeps the distribution's shape."""

    num_requests: int = 24
    mu: float = 9.90
    sigma: float = 1.00
    scale: float = 1 / 64
    min_tokens: int = 16
    max_tokens: int = 1800
    shared_prefix_fraction: float = 0.2
    output_tokens: int = 12
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError("num_requests must be >= 1")
        if not 0 < self.min_tokens < self.max_tokens:
            raise ValueError("need 0 < min_tokens < max_tokens")
        if self.sigma <= 0 or self.scale <= 0:
            raise ValueError("sigma and scale must be > 0")
        if not 0 <= self.shared_prefix_fraction < 1:
            raise ValueError("shared_prefix_fraction must be in [0, 1)")


@dataclass(frozen=True)
class DemoPrompt:
    text: str
    target_tokens: int
    extends: int | None  # index of the earlier prompt this one starts with


def sample_lengths(spec: WorkloadSpec) -> list[int]:
    """Inverse-CDF sampling of the truncated log-normal: exact truncation, reproducible."""
    nd = NormalDist()
    mu = spec.mu + math.log(spec.scale)
    lo = nd.cdf((math.log(spec.min_tokens) - mu) / spec.sigma)
    hi = nd.cdf((math.log(spec.max_tokens) - mu) / spec.sigma)
    rng = random.Random(spec.seed)
    out = []
    for _ in range(spec.num_requests):
        u = lo + (hi - lo) * rng.random()
        u = min(max(u, 1e-12), 1 - 1e-12)
        out.append(int(round(math.exp(mu + spec.sigma * nd.inv_cdf(u)))))
    return [min(max(n, spec.min_tokens), spec.max_tokens) for n in out]


def build_prompts(spec: WorkloadSpec, count_tokens: Callable[[str], int]) -> list[DemoPrompt]:
    """Text prompts whose token counts (as ``count_tokens`` measures them) are close to the sampled
    lengths. A ``shared_prefix_fraction`` of them extend an earlier, shorter prompt."""
    rng = random.Random(spec.seed + 1)
    prompts: list[DemoPrompt] = []
    for i, target in enumerate(sample_lengths(spec)):
        base_idx = None
        base = ""
        if prompts and rng.random() < spec.shared_prefix_fraction:
            shorter = [j for j, p in enumerate(prompts) if p.extends is None and p.target_tokens < target]
            if shorter:
                base_idx = rng.choice(shorter)
                base = prompts[base_idx].text
        text = grow_to(base, target, count_tokens, rng, tag=i)
        prompts.append(DemoPrompt(text=text, target_tokens=target, extends=base_idx))
    return prompts


def grow_to(base: str, target: int, count_tokens: Callable[[str], int], rng: random.Random, tag: int) -> str:
    # A request-unique opening word keeps unrelated prompts from sharing cached blocks by chance.
    words = [base] if base else [f"request{tag}:"]
    text = " ".join(words)
    # Grow in big steps, then fine steps: token counting is the slow part on long prompts.
    while count_tokens(text) < target:
        have = count_tokens(text)
        step = max(1, (target - have) // 2)
        words.extend(rng.choice(_WORDS) for _ in range(step))
        text = " ".join(words)
    while len(words) > 1 and count_tokens(" ".join(words[:-1])) >= target:
        words.pop()
    return " ".join(words)
