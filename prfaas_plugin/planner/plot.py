"""Figures like the paper's Fig. 5: Lambda_max against t (with the crossing curves) and against N_p."""

from __future__ import annotations

from pathlib import Path

from prfaas_plugin.planner.search import PlanResult


def write_plots(result: PlanResult, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = result.curves
    if not c:
        raise ValueError("plan() was run without curves; pass with_curves=True")
    out_dir.mkdir(parents=True, exist_ok=True)
    b = result.best
    paths = []

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ts_k = [t / 1000 for t in c["t"]]
    cap = max(c["lambda_t"]) * 2.2

    def clip(ys: list[float]) -> list[float]:  # the 1/p branches diverge at the ends
        return [min(y, cap) for y in ys]

    ax.plot(ts_k, clip(c["prfaas_over_p"]), color="tab:red", lw=1.4, label=r"$\Theta_{prfaas}/p$")
    ax.plot(ts_k, clip(c["pdp_over_1mp"]), color="tab:blue", lw=1.4, label=r"$\Theta_{pd\text{-}p}/(1-p)$")
    ax.plot(ts_k, c["theta_pd_d"], color="tab:green", lw=1.2, ls=":", label=r"$\Theta_{pd\text{-}d}$")
    ax.plot(ts_k, c["lambda_t"], color="black", lw=2.2, label=r"$\Lambda_{max}$")
    ax.axvline(b.threshold / 1000, color="grey", ls="--", lw=1)
    ax.annotate(
        f"t = {b.threshold / 1000:.1f}K\n$\\Lambda_{{max}}$ = {b.lambda_max:.2f} req/s",
        xy=(b.threshold / 1000, b.lambda_max),
        xytext=(0.03, 0.72),
        textcoords="axes fraction",
        arrowprops={"arrowstyle": "->", "color": "grey"},
    )
    ax.set_xlim(0, min(max(ts_k), 3 * b.threshold / 1000 + 20))
    ax.set_ylim(0, cap)
    ax.set_xlabel("routing threshold t (K tokens)")
    ax.set_ylabel("throughput (req/s)")
    ax.set_title(f"Throughput vs threshold at N_p={b.n_p}, N_d={b.n_d}")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    p1 = out_dir / "lambda_vs_threshold.png"
    fig.savefig(p1, dpi=120)
    plt.close(fig)
    paths.append(p1)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.bar(c["n_p"], c["lambda_np"], color=["tab:orange" if n == b.n_p else "tab:gray" for n in c["n_p"]])
    for n, lam in zip(c["n_p"], c["lambda_np"]):
        ax.text(n, lam, f"{lam:.2f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(
        result.homogeneous.lambda_max,
        color="tab:blue",
        ls="--",
        lw=1,
        label=f"homogeneous PD {result.homogeneous.lambda_max:.2f}",
    )
    ax.axhline(
        result.naive.lambda_max,
        color="tab:purple",
        ls=":",
        lw=1,
        label=f"naive heterogeneous {result.naive.lambda_max:.2f}",
    )
    ax.set_xlabel(f"PD prefill instances N_p (N_d = {result.system.n_pd} - N_p)")
    ax.set_ylabel(r"$\Lambda_{max}$ (req/s)")
    ax.set_title(f"Throughput vs P/D split at t = {b.threshold / 1000:.1f}K")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    p2 = out_dir / "lambda_vs_split.png"
    fig.savefig(p2, dpi=120)
    plt.close(fig)
    paths.append(p2)
    return paths
