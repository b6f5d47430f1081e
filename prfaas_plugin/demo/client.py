"""How the demo times one streamed completion: one home for the workload's client (run.py) and
the calibration phase (calibrate.py), so the simulator is calibrated on the very TTFT the demo
reports.

TTFT is from just before the request is sent to the first ``data:`` event with a choice; total is
to the end of the stream. The answer's text and headers come back too (the router's route,
uncached tokens and threshold are headers).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class StreamedAnswer:
    ttft_s: float  # the total when no event came
    total_s: float
    text: str
    headers: httpx.Headers


def stream_completion(c: httpx.Client, url: str, model: str, prompt: str, max_tokens: int, rid: str) -> StreamedAnswer:
    t0 = time.monotonic()
    ttft: float | None = None
    text: list[str] = []
    with c.stream(
        "POST",
        f"{url}/v1/completions",
        headers={"x-request-id": rid},
        json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True},
    ) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if ttft is None:
                ttft = time.monotonic() - t0
            text.append(json.loads(line[6:])["choices"][0].get("text", ""))
        headers = resp.headers
    total = time.monotonic() - t0
    return StreamedAnswer(ttft if ttft is not None else total, total, "".join(text), headers)
