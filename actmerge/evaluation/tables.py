"""A report as a markdown table (the card's evaluation section, ``eval``'s printed table): the metric
columns in a fixed order, each value beside the base's and the ratio to it."""

from __future__ import annotations

from .kl import wants_kl
from .records import Report, Row

COLUMNS = (
    "toxic_fraction",
    "toxic_fraction_hard",
    "toxicity_mean",
    "toxicity_mean_hard",
    "concept_presence",
    "concept_presence_hard",
    "perplexity",
    "perplexity_ratio",
    "kl",
    "first_token_kl",
    "similarity",
)
# columns that are already relative to the base (no "base …, ×…" beside them)
RELATIVE = ("perplexity_ratio", "kl", "first_token_kl", "similarity")


def columns(report: Report) -> list[str]:
    """The table's metric columns: the known ones in order, then any others (e.g. lm-eval scores)."""
    present = {k for r in report.rows for k in r.metrics}
    return [m for m in COLUMNS if m in present] + sorted(present - set(COLUMNS))


def cell(row: Row, name: str) -> str:
    """``value`` for the base row; ``value (base b, ×ratio)`` for the others."""
    v = row.metrics.get(name)
    if v is None:
        return "-"
    b = row.baseline.get(name)
    if b is None or name in RELATIVE or row.kind == "base":
        return fmt(v)
    r = row.ratio.get(name)
    return f"{fmt(v)} (base {fmt(b)}" + (f", ×{r:.3g})" if r is not None else ")")


def markdown_table(report: Report) -> str:
    names = columns(report)
    lines = ["| row | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i, r in enumerate(report.rows):
        cells = [fmt(r.metrics.get(n)) if i == 0 else cell(r, n) for n in names]
        lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    c = report.config
    lines.append("")
    how = "sampled (T=1, top_p=0.3, rep. penalty 1.2)" if c.sample else "greedy"
    notes = [f"{len(c.prompts)} prompts, {how}, {c.max_new_tokens} new tokens"]
    if c.chat == "on":
        notes.append("prompts sent as user turns of the chat template (the assistant's reply scored)")
    notes += [f"_{k}: {len(v)} further held-out prompts" for k, v in c.splits.items()]
    if wants_kl(c):
        notes.append("kl = mean per-token KL(base ‖ steered) in nats on the neutral text")
    if "toxicity" in c.metrics:
        notes.append(f"scorer `{c.scorer}` (toxic = probability > {c.threshold})")
    if "concept" in c.metrics:
        notes.append(f"concept = mentions one of {len(c.keywords)} keywords")
    lines.append(", ".join(notes) + ".")
    return "\n".join(lines)


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}"
