"""Strength sweeps: the base model, hooked previews at several strengths and baked checkpoints,
measured on identical prompts and settings, one row each.

Metrics are a registry (``METRICS``) so that recipes pick theirs. A metric reads the row's
generations (and, for ``similarity``, the reference row's) or the row's model (perplexity). Next to
perplexity, the cost of steering is measured as KL(base ‖ steered) of the next-token distributions on
the neutral text (``kl``, per token) and after short neutral prompts (``first_token_kl``; ``kl.drift``).
Every row carries the first (base) row's value of each metric as its baseline, and the ratio to it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from ..errors import ActmergeError
from ..io.provenance import read_bake_info
from ..kinds.llm.hooks import steer
from ..maps import MapSet
from ..placement import Placement, input_device
from .kl import drift, steered_fn, wants_kl
from .metrics import concept_presence, continuations, get_scorer, perplexity, similarity
from .records import EvalConfig, Report, Row

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
    docs/design.md §2), and each ``baked`` directory (loaded by plain transformers, under ``placement``
    when it has a device map or memory budget: the base's, so a checkpoint beyond RAM reads from disk)."""

    maps: MapSet | None = None
    strengths: tuple[float, ...] = ()
    baked: tuple[Path, ...] = ()
    include_base: bool = False
    support: dict | None = None
    placement: Placement | None = None

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
        if wants_kl(cfg):
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
        spread = rows.placement.kwargs() if rows.placement is not None and rows.placement.dispatched else {}
        bm = AutoModelForCausalLM.from_pretrained(str(path), dtype=next(model.parameters()).dtype, **spread)
        if not spread:  # else placed as the base: its layers on the base's devices, beyond them on disk
            bm.to(input_device(model))
        bm.eval()
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
        if wants_kl(cfg):
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
