"""The demo's report: per-request records, totals, JSON and a PNG figure."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class RequestRecord:
    request_id: str
    route: str  # "prfaas" (remote prefill) | "local" | "fallback"
    prompt_tokens: int
    uncached_tokens: int
    threshold_tokens: float
    kv_bytes: int
    #: remote producer's round trip (prefill + handing the KV to the transfer engine)
    remote_prefill_s: float | None
    ttft_s: float
    total_s: float
    started_at_s: float  # since the workload started
    output_equal: bool | None = None  # vs the single-instance reference run
    error: str | None = None
    #: the router's own record of it (run.py ROUTER_FIELDS): its clock, queue, producer, TTFT
    router: dict | None = None


@dataclass
class DemoReport:
    link: dict
    requests: list[RequestRecord]
    threshold_timeline: list[tuple[float, float]] = field(default_factory=list)
    #: why each change of ``threshold_timeline`` happened (the router's own words)
    threshold_reasons: list[str] = field(default_factory=list)
    #: the request path timed per route before the workload (demo/calibrate.py)
    calibration: dict | None = None
    #: the workload's start on the wall clock (``router["started_at"]``, the router's decision, is on it too)
    workload_t0_wall: float | None = None
    wall_s: float = 0.0
    startup_s: float = 0.0

    # -- totals -------------------------------------------------------------------------------
    @property
    def offload_fraction(self) -> float:
        ok = [r for r in self.requests if r.error is None]
        return sum(r.route == "prfaas" for r in ok) / len(ok) if ok else 0.0

    @property
    def egress_gbit_per_s(self) -> float:
        """Average KV egress of the PrfaaS side over the workload's wall time."""
        total = sum(r.kv_bytes for r in self.requests if r.route == "prfaas")
        return total * 8 / self.wall_s / 1e9 if self.wall_s > 0 else 0.0

    @property
    def all_outputs_equal(self) -> bool:
        return bool(self.requests) and all(r.output_equal is True for r in self.requests)

    def routes_used(self) -> set[str]:
        return {r.route for r in self.requests if r.error is None}

    def totals(self) -> dict:
        link_gbit = float(self.link.get("rate_gbit") or 0.0)
        return {
            "requests": len(self.requests),
            "errors": sum(r.error is not None for r in self.requests),
            "offload_fraction": round(self.offload_fraction, 4),
            "egress_gbit_per_s": round(self.egress_gbit_per_s, 6),
            "link_gbit": link_gbit,
            "link_utilisation": round(self.egress_gbit_per_s / link_gbit, 6) if link_gbit else None,
            "kv_bytes_total": sum(r.kv_bytes for r in self.requests),
            "all_outputs_equal": self.all_outputs_equal,
            "routes_used": sorted(self.routes_used()),
            "wall_s": round(self.wall_s, 3),
            "startup_s": round(self.startup_s, 3),
        }

    # -- output ----------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(
            {
                "totals": self.totals(),
                "link": self.link,
                "threshold_timeline": self.threshold_timeline,
                "threshold_reasons": self.threshold_reasons,
                "calibration": self.calibration,
                "workload_t0_wall": self.workload_t0_wall,
                "requests": [asdict(r) for r in self.requests],
            },
            indent=2,
        )

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        jpath = out_dir / "report.json"
        jpath.write_text(self.to_json())
        ppath = out_dir / "report.png"
        plot_report(self, ppath)
        return jpath, ppath

    def table(self) -> str:
        head = (
            f"{'id':>10} {'route':>8} {'l_total':>8} {'l':>6} {'t':>6} {'KV MiB':>8} {'remote ms':>9} "
            f"{'TTFT ms':>8} {'equal':>6}"
        )
        rows = [head, "-" * len(head)]
        for r in self.requests:
            xfer = f"{r.remote_prefill_s * 1e3:9.1f}" if r.remote_prefill_s is not None else f"{'-':>9}"
            eq = "-" if r.output_equal is None else ("yes" if r.output_equal else "NO")
            rows.append(
                f"{r.request_id[-10:]:>10} {r.route:>8} {r.prompt_tokens:>8} {r.uncached_tokens:>6} "
                f"{r.threshold_tokens:>6.0f} {r.kv_bytes / 2**20:>8.2f} {xfer} {r.ttft_s * 1e3:>8.1f} {eq:>6}"
            )
        return "\n".join(rows)


def plot_report(report: DemoReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = {"prfaas": "tab:red", "local": "tab:blue", "fallback": "tab:orange"}
    ax = axes[0]
    for route, color in colors.items():
        rs = [r for r in report.requests if r.route == route and r.error is None]
        if rs:
            ax.scatter([r.uncached_tokens for r in rs], [r.ttft_s * 1e3 for r in rs], c=color, label=route, s=18)
    if report.threshold_timeline:
        ax.axvline(report.threshold_timeline[-1][1], color="grey", ls="--", label="final t")
    ax.set_xlabel("uncached prompt tokens l")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title("Route and TTFT per request")
    ax.legend()

    ax = axes[1]
    if report.threshold_timeline:
        xs, ys = zip(*report.threshold_timeline)
        ax.step(xs, ys, where="post", color="black")
    ax.set_xlabel("time since router start (s)")
    ax.set_ylabel("threshold t (tokens)")
    ax.set_title("Threshold over time")

    ax = axes[2]
    remote = sorted(
        (r for r in report.requests if r.route == "prfaas" and r.error is None), key=lambda r: r.started_at_s
    )
    if remote:
        t_end = [r.started_at_s + r.total_s for r in remote]
        cum = []
        acc = 0
        for r in remote:
            acc += r.kv_bytes
            cum.append(acc * 8 / 1e9)
        ax.plot(t_end, cum, marker="o", color="tab:red", label="KV sent (Gbit, cumulative)")
    link = float(report.link.get("rate_gbit") or 0.0)
    if link and report.wall_s:
        ax.plot(
            [0, report.wall_s], [0, link * report.wall_s], color="grey", ls="--", label=f"link capacity {link:g} Gbit/s"
        )
    ax.set_xlabel("time since workload start (s)")
    ax.set_ylabel("Gbit")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_title(f"Egress {report.egress_gbit_per_s * 1e3:.2f} Mbit/s avg, offload {report.offload_fraction:.0%}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
