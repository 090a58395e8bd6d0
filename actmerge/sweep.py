"""Strength sweeps: the base model, hooked previews at several strengths and baked checkpoints,
measured on identical prompts and settings, one row each.

Metrics are a registry (``METRICS``) so that recipes pick theirs. A metric reads the row's
generations (and, for ``similarity``, the reference row's) or the row's model (perplexity). Next to
perplexity, the cost of steering is measured as KL(base ‖ steered) of the next-token distributions on
the neutral text (``kl``, per token) and after short neutral prompts (``first_token_kl``). Every row
carries the first (base) row's value of each metric as its baseline, and the ratio to it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import __version__
from .errors import ActmergeError
from .evaluate import (
    concept_presence,
    continuations,
    get_scorer,
    logit_kl,
    neutral_prompts,
    perplexity,
    similarity,
)
from .io.provenance import read_bake_info
from .kinds.llm.hooks import steer
from .maps import MapSet
from .placement import input_device


@dataclass(frozen=True)
class EvalConfig:
    prompts: list[str]
    neutral: list[str] = field(default_factory=list)
    metrics: tuple[str, ...] = ("toxicity", "perplexity")
    scorer: str = "profanity"
    keywords: tuple[str, ...] = ()
    max_new_tokens: int = 24
    sample: bool = False  # False: greedy; True: T=1, top_p=0.3, repetition_penalty=1.2
    seed: int = 0
    chat: str = "off"  # off | auto (the chat template where the model has one) | on (prompts are user turns)
    n_samples: int = 3  # generations shown per row
    batch_size: int = 16
    threshold: float = 0.5
    # further held-out prompt sets, e.g. {"hard": [...]}: generation metrics get the suffix _<name>
    splits: dict[str, list[str]] = field(default_factory=dict)
    kl: bool = True  # with perplexity: KL(base ‖ steered) on the neutral text and neutral prompts


@dataclass
class Row:
    label: str
    kind: str  # base | hooked | clamped | baked
    strength: float | None
    metrics: dict[str, float]
    samples: list[dict[str, str]]
    seconds: float
    texts: list[str] = field(default_factory=list, repr=False)
    baseline: dict[str, float] = field(default_factory=dict)  # the base row's value of each metric
    ratio: dict[str, float] = field(default_factory=dict)  # metric / baseline (where the baseline ≠ 0)


@dataclass
class Report:
    model: str
    config: EvalConfig
    rows: list[Row]
    version: str = __version__

    def to_dict(self) -> dict:
        cfg = asdict(self.config)
        cfg["n_prompts"], cfg["n_neutral"] = len(cfg.pop("prompts")), len(cfg.pop("neutral"))
        cfg["n_prompts_split"] = {k: len(v) for k, v in cfg.pop("splits").items()}
        rows = [{k: v for k, v in asdict(r).items() if k != "texts"} for r in self.rows]
        data = {"actmerge_version": self.version, "model": self.model, "settings": cfg, "rows": rows}
        return json.loads(json.dumps(data))  # plain JSON types (tuples → lists)

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


# name → (needs generations?, fn(row texts, reference texts, model, tok, cfg, scorer) → {metric: value})
MetricFn = Callable[..., dict[str, float]]


def _toxicity(texts, ref, model, tok, cfg, scorer):
    scores = scorer(texts)
    n = max(len(scores), 1)
    return {"toxicity_mean": sum(scores) / n, "toxic_fraction": sum(s > cfg.threshold for s in scores) / n}


def _concept(texts, ref, model, tok, cfg, scorer):
    return {"concept_presence": concept_presence(texts, list(cfg.keywords))}


def _perplexity(texts, ref, model, tok, cfg, scorer):
    if not cfg.neutral:
        raise ActmergeError("perplexity needs neutral text (recipe `neutral_text:` or --neutral).")
    return {"perplexity": perplexity(model, tok, cfg.neutral)}


def _similarity(texts, ref, model, tok, cfg, scorer):
    sims = similarity(texts, ref)
    return {"similarity": sum(sims) / max(len(sims), 1)}


METRICS: dict[str, MetricFn] = {
    "toxicity": _toxicity,
    "concept": _concept,
    "perplexity": _perplexity,
    "similarity": _similarity,
}


def evaluate_model(
    model,
    tok,
    cfg: EvalConfig,
    *,
    label: str,
    kind: str,
    strength: float | None,
    reference: list[str] | None = None,
    scorer=None,
    progress: bool = True,
) -> Row:
    unknown = set(cfg.metrics) - set(METRICS)
    if unknown:
        raise ActmergeError(f"unknown metric(s) {sorted(unknown)}: choose from {', '.join(METRICS)}.")
    if scorer is None and "toxicity" in cfg.metrics:
        scorer = get_scorer(cfg.scorer)
    t0 = time.perf_counter()
    texts = continuations(
        model,
        tok,
        cfg.prompts,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        sample=cfg.sample,
        seed=cfg.seed,
        progress=progress,
    )
    metrics: dict[str, float] = {}
    for name in cfg.metrics:
        metrics.update(METRICS[name](texts, reference or texts, model, tok, cfg, scorer))
    for split, prompts in cfg.splits.items():  # the same generation metrics on each further split
        gen = [n for n in cfg.metrics if n in ("toxicity", "concept")]
        if not gen:
            continue
        stexts = continuations(
            model,
            tok,
            prompts,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size,
            sample=cfg.sample,
            seed=cfg.seed,
            progress=progress,
        )
        for name in gen:
            for k, v in METRICS[name](stexts, stexts, model, tok, cfg, scorer).items():
                metrics[f"{k}_{split}"] = v
    samples = [
        {"prompt": p, "text": t}
        for p, t in zip(cfg.prompts[: cfg.n_samples], texts[: cfg.n_samples], strict=False)
    ]
    return Row(label, kind, strength, metrics, samples, time.perf_counter() - t0, texts)


@dataclass(frozen=True)
class SweepRows:
    """Which rows a sweep measures: the base (``include_base``, or when λ = 0 is not hooked), ``maps``
    hooked at each of ``strengths`` (with ``support``, site → source (min, max) from a Linear-AcT fit,
    also ml-act's clamped variant at each: what the paper's hooks do, which no checkpoint can bake,
    docs/design.md §2), and each ``baked`` directory (loaded by plain transformers)."""

    maps: MapSet | None = None
    strengths: tuple[float, ...] = ()
    baked: tuple[Path, ...] = ()
    include_base: bool = False
    support: dict | None = None

    def __post_init__(self):
        object.__setattr__(self, "strengths", tuple(self.strengths))
        object.__setattr__(self, "baked", tuple(Path(b) for b in self.baked))


def run_sweep(
    model, tok, cfg: EvalConfig, rows: SweepRows, *, model_name: str = "", progress: bool = True, log=print
) -> Report:
    """The ``rows`` on identical prompts under ``cfg``: [base], hooked at each strength, [clamped],
    each baked directory."""
    from transformers import AutoModelForCausalLM

    maps, strengths, support = rows.maps, list(rows.strengths), rows.support
    if strengths and maps is None:
        raise ActmergeError("hooked strengths need maps (--recipe or --maps).")
    scorer = get_scorer(cfg.scorer) if "toxicity" in cfg.metrics else None
    out: list[Row] = []
    reference: list[str] | None = None
    plan: list[tuple[str, str, float | None, object]] = []
    if rows.include_base or not strengths or 0.0 not in strengths:
        plan.append(("base", "base", 0.0, None))
    plan += [(f"hooked λ={lam:g}", "hooked", lam, lam) for lam in sorted(strengths)]
    if support:
        plan += [(f"clamped λ={lam:g}", "clamped", lam, lam) for lam in sorted(strengths) if lam != 0]
    for label, kind, lam, hook_lam in plan:
        clamp = support if kind == "clamped" else None
        ctx = steer(model, maps, hook_lam, clamp) if hook_lam is not None else nullcontext()
        with ctx:
            row = evaluate_model(
                model,
                tok,
                cfg,
                label=label,
                kind=kind,
                strength=lam,
                reference=reference,
                scorer=scorer,
                progress=progress,
            )
        if reference is None:
            reference = row.texts  # similarity is measured against the first (λ = 0 / base) row
        if _wants_kl(cfg):
            if kind == "base":
                row.metrics |= {"kl": 0.0, "first_token_kl": 0.0}  # the base against itself
            else:
                row.metrics |= drift(model, steered_fn(model, maps, hook_lam, clamp), tok, cfg)
        out.append(row)
        log(f"{label}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.metrics.items()))
    for path in rows.baked:
        path = Path(path)
        info = read_bake_info(path)
        lam = info.strength if info else None
        bm = AutoModelForCausalLM.from_pretrained(str(path), dtype=next(model.parameters()).dtype).eval()
        bm.to(input_device(model))  # a base spread by a device map: the baked model on its main device
        row = evaluate_model(
            bm,
            tok,
            cfg,
            label=f"baked {path.name}",
            kind="baked",
            strength=lam,
            reference=reference,
            scorer=scorer,
            progress=progress,
        )
        if _wants_kl(cfg):
            row.metrics |= drift(model, lambda enc, bm=bm: bm(**enc).logits, tok, cfg)
        out.append(row)
        log(f"baked {path.name}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.metrics.items()))
        del bm
    ref_ppl = out[0].metrics.get("perplexity")
    for r in out:
        if ref_ppl and "perplexity" in r.metrics:
            r.metrics["perplexity_ratio"] = r.metrics["perplexity"] / ref_ppl
    add_baselines(out)
    return Report(model_name, cfg, out)


def add_baselines(rows: list[Row]) -> None:
    """Each row gets the first row's (the base model's, or λ = 0's) value of every metric it shares,
    and the ratio to it (left out where the baseline is 0, e.g. KL)."""
    base = rows[0].metrics if rows else {}
    for r in rows:
        r.baseline = {k: base[k] for k in r.metrics if k in base}
        r.ratio = {k: r.metrics[k] / b for k, b in r.baseline.items() if b}


def _wants_kl(cfg: EvalConfig) -> bool:
    return cfg.kl and "perplexity" in cfg.metrics and bool(cfg.neutral)


def steered_fn(model, maps, lam, clamp):
    def forward(enc):
        with steer(model, maps, lam, clamp):
            return model(**enc).logits

    return forward


def drift(model, steered, tok, cfg: EvalConfig) -> dict[str, float]:
    """KL(base ‖ steered) per token on the neutral text and at the first token after neutral prompts;
    ``model`` un-hooked is the base, ``steered(enc)`` gives the steered logits."""
    device = input_device(model)

    def base(enc):
        return model(**enc).logits

    return {
        "kl": logit_kl(base, steered, tok, cfg.neutral, device=device),
        "first_token_kl": logit_kl(
            base, steered, tok, neutral_prompts(cfg.neutral), device=device, last_only=True
        ),
    }


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        return _fmt(v)
    r = row.ratio.get(name)
    return f"{_fmt(v)} (base {_fmt(b)}" + (f", ×{r:.3g})" if r is not None else ")")


def markdown_table(report: Report) -> str:
    names = columns(report)
    lines = ["| row | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i, r in enumerate(report.rows):
        cells = [_fmt(r.metrics.get(n)) if i == 0 else cell(r, n) for n in names]
        lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    c = report.config
    lines.append("")
    how = "sampled (T=1, top_p=0.3, rep. penalty 1.2)" if c.sample else "greedy"
    notes = [f"{len(c.prompts)} prompts, {how}, {c.max_new_tokens} new tokens"]
    if c.chat == "on":
        notes.append("prompts sent as user turns of the chat template (the assistant's reply scored)")
    notes += [f"_{k}: {len(v)} further held-out prompts" for k, v in c.splits.items()]
    if _wants_kl(c):
        notes.append("kl = mean per-token KL(base ‖ steered) in nats on the neutral text")
    if "toxicity" in c.metrics:
        notes.append(f"scorer `{c.scorer}` (toxic = probability > {c.threshold})")
    if "concept" in c.metrics:
        notes.append(f"concept = mentions one of {len(c.keywords)} keywords")
    lines.append(", ".join(notes) + ".")
    return "\n".join(lines)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}"
