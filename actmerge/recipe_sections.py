"""A recipe as the code reads it: the flat YAML schema users write (``recipe.Recipe``) in five
sections — fit, fold, eval, tune, chat — with every per-family field (``sites``, ``lineas``,
``top_neurons``, ``strength``) resolved for one architecture row, once per model (``resolve``). The
sections are plain frozen values: a reader never asks the recipe ``…_for(arch)`` again.

Per-family fields resolve as the fit uses them: ``lineas`` only for ``method: lineas`` (else
``None``), ``top_neurons`` only for the other methods (LinEAS: 1). A family missing from a per-family
field is not an error until that value is needed: it resolves to ``None``, and ``Sections.need``
gives the value or raises the message that says what to add. ``arch=None`` (a diffusers pipeline,
which has no family rows): a plain value, or the ``default`` entry."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import RecipeError
from .recipe import LineasOptions, Recipe, SiteSpec, for_family


@dataclass(frozen=True)
class FitSection:
    """What the fit reads: the method, where (sites, raw modules), on which sentences and how pooled."""

    method: str
    sites: tuple[SiteSpec, ...] | None  # None: no entry for this family (``Sections.need``)
    modules: tuple[str, ...]
    lineas: LineasOptions | None  # method: lineas only
    top_neurons: float | None  # the fraction of each site's neurons moved (LinEAS: 1)
    max_sentences: int
    max_tokens: int
    batch_size: int
    pooling: str
    skip_special: bool  # pooling_special_tokens: exclude
    sample: str
    degenerate: str  # degenerate_neurons
    incremental: bool
    incremental_clamp: bool | None
    incremental_order: str
    fit_shift: bool
    seed: int


@dataclass(frozen=True)
class FoldSection:
    """What the fold reads: fold-aware fitting, runtimes, config flags, and the default strength."""

    fold_aware: bool
    allow_config_change: bool
    targets: tuple[str, ...]
    strength: float | None  # None: `strength:` has no entry for this family (``Sections.need``)


@dataclass(frozen=True)
class EvalSection:
    """What ``eval`` and ``bake --eval`` read (paths resolved against the recipe's directory)."""

    prompts: Path | None
    prompts_hard: Path | None
    neutral_text: Path | None
    metrics: tuple[str, ...]
    scorer: str
    keywords: Path | None  # read for the concept metric only
    max_new_tokens: int
    seed: int


@dataclass(frozen=True)
class TuneSection:
    """The tuning split ``tune`` reads (never the eval prompts)."""

    prompts: Path | None
    neutral: Path | None


@dataclass(frozen=True)
class ChatSection:
    """Chat models: prompts as user turns, and the fitting sentences placed by the fit mode ``fit``
    (``chat.FIT_MODES``)."""

    on: bool
    fit: str
    instruction: str | None
    requests: Path | None


@dataclass(frozen=True)
class Sections:
    name: str
    family: str | None  # the architecture row resolved for (None: no row, e.g. a pipeline)
    fit: FitSection
    fold: FoldSection
    eval: EvalSection
    tune: TuneSection
    chat: ChatSection
    missing: dict[str, str] = field(default_factory=dict)  # per-family field → what to add to the recipe

    def need(self, what: str):
        """The resolved per-family value ``what`` (sites, lineas, top_neurons, strength), or the
        ``RecipeError`` saying which entry the recipe lacks for this family."""
        if what in self.missing:
            raise RecipeError(self.missing[what])
        return getattr(self.fold if what == "strength" else self.fit, what)


def _per_family(value, arch, what: str, default, missing: dict[str, str]):
    """A per-family field for ``arch`` (None, with the message in ``missing``, when the recipe has no
    entry for it); ``arch`` None: the value itself, or its ``default`` entry."""
    if arch is None:
        return value.get("default", default) if isinstance(value, dict) else value
    try:
        return for_family(value, arch, what)
    except RecipeError as exc:
        missing[what] = str(exc)
        return None


def _path(recipe: Recipe, p: Path | None) -> Path | None:
    return None if p is None else recipe.path(p)


def sections_of(recipe: Recipe, arch=None) -> Sections:
    """``recipe`` in sections, its per-family fields resolved for the architecture row ``arch``
    (``sites.Architecture``; None for a pipeline)."""
    r = recipe
    lineas, missing = r.method == "lineas", {}
    sites = _per_family(r.sites, arch, "sites", [], missing)
    fit = FitSection(
        method=r.method,
        sites=None if sites is None else tuple(sites),
        modules=tuple(r.modules),
        lineas=_per_family(r.lineas, arch, "lineas", LineasOptions(), missing) if lineas else None,
        top_neurons=1.0 if lineas else _per_family(r.top_neurons, arch, "top_neurons", 1.0, missing),
        max_sentences=r.max_sentences,
        max_tokens=r.max_tokens,
        batch_size=r.batch_size,
        pooling=r.pooling,
        skip_special=r.pooling_special_tokens == "exclude",
        sample=r.sample,
        degenerate=r.degenerate_neurons,
        incremental=r.incremental,
        incremental_clamp=r.incremental_clamp,
        incremental_order=r.incremental_order,
        fit_shift=r.fit_shift,
        seed=r.seed,
    )
    strength = _per_family(r.strength, arch, "strength", None, missing)
    fold = FoldSection(r.fold_aware, r.allow_config_change, tuple(r.targets), strength)
    ev = EvalSection(
        prompts=_path(r, r.eval_prompts),
        prompts_hard=_path(r, r.eval_prompts_hard),
        neutral_text=_path(r, r.neutral_text),
        metrics=tuple(r.metrics),
        scorer=r.scorer,
        keywords=_path(r, r.keywords),
        max_new_tokens=r.eval_max_new_tokens,
        seed=r.seed,
    )
    tune = TuneSection(_path(r, r.tune_prompts), _path(r, r.tune_neutral))
    chat = ChatSection(r.chat, r.chat_fit, r.instruction, _path(r, r.chat_requests))
    family = None if arch is None else arch.name
    return Sections(r.name, family, fit, fold, ev, tune, chat, missing)
