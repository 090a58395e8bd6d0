"""The figures of a report directory: sweep.png (each metric against λ) and tune.png (behaviour
against cost, the chosen strength marked). Drawn into the temporary directory that
``io.output.write_report_dir`` fills."""

from __future__ import annotations

from pathlib import Path

from ..errors import ActmergeError
from .records import Report, TuneResult
from .search import Point


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


PLOTTED = (
    "toxic_fraction",
    "toxic_fraction_hard",
    "toxicity_mean",
    "concept_presence",
    "perplexity_ratio",
    "kl",
    "similarity",
)


def plot(report: Report, path: Path) -> dict[str, int]:
    """sweep.png: one panel per metric vs λ; the hooked sweep as a line, baked points as crosses.
    Returns {metric: number of series drawn} (for tests)."""
    plt = _pyplot()
    names = [m for m in PLOTTED if any(m in r.metrics for r in report.rows)]
    if not names:
        raise ActmergeError("nothing to plot: no row has a plottable metric.")
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    series: dict[str, int] = {}
    for ax, name in zip(axes[0], names, strict=True):
        n = 0
        line = [
            r
            for r in report.rows
            if r.kind in ("hooked", "base") and r.strength is not None and name in r.metrics
        ]
        if line:
            pts = sorted({r.strength: r.metrics[name] for r in line}.items())
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="hooked preview")
            n += 1
        clamped = [r for r in report.rows if r.kind == "clamped" and name in r.metrics]
        if clamped:
            ax.plot(
                [r.strength for r in clamped],
                [r.metrics[name] for r in clamped],
                "s--",
                alpha=0.7,
                label="ml-act clamped (not bakeable)",
            )
            n += 1
        baked = [r for r in report.rows if r.kind == "baked" and r.strength is not None and name in r.metrics]
        if baked:
            ax.plot(
                [r.strength for r in baked],
                [r.metrics[name] for r in baked],
                "x",
                markersize=11,
                markeredgewidth=2.5,
                color="crimson",
                linestyle="none",
                label="baked checkpoint",
            )
            n += 1
        ax.set_xlabel("strength λ")
        ax.set_title(name.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        series[name] = n
    fig.suptitle(f"{report.model}: steering strength sweep ({len(report.config.prompts)} prompts)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return series


def plot_tradeoff(result: TuneResult, path: Path) -> Path:
    """tune.png: behaviour metric vs cost (perplexity ratio; KL beside it), the chosen point marked."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8))
    pts = sorted((p for p in result.points if p.behaviour is not None), key=lambda p: p.strength)
    base = Point(0.0, {"perplexity_ratio": 1.0, "kl": 0.0}, True, result.base_behaviour)
    if result.base_behaviour is not None and all(p.strength != 0 for p in pts):
        pts = [base, *pts]
    for ax, cost, limit, label in (
        (axes[0], "perplexity_ratio", result.budget.max_ppl_ratio, "perplexity ratio to base"),
        (axes[1], "kl", result.budget.max_kl, "KL(base ‖ steered), nats/token"),
    ):
        ax.plot([p.cost[cost] for p in pts], [p.behaviour for p in pts], "o-", label="hooked preview")
        for p in pts:  # the bootstrap interval over the tuning texts
            if cost in p.interval:
                ax.plot(p.interval[cost], [p.behaviour] * 2, "|-", color="C0", alpha=0.5)
        for p in pts:
            ax.annotate(f"λ={p.strength:g}", (p.cost[cost], p.behaviour), fontsize=7, alpha=0.7)
        c = result.chosen
        ax.plot(
            [c.cost[cost]],
            [c.behaviour],
            "*",
            color="crimson",
            markersize=15,
            label=f"chosen λ={c.strength:g}",
        )
        if limit is not None:
            ax.axvline(limit, color="gray", linestyle="--", label="budget")
        ax.set_xlabel(label)
        ax.set_ylabel(result.metric.replace("_", " ") + " (tuning prompts)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result.model} · {result.recipe}: behaviour vs cost ({result.budget.describe()})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
