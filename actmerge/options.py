"""The verbs' options as frozen values: one per verb (``BakeOptions``, ``VerifyOptions``,
``EvalOptions``, ``TuneOptions``), built once — by the CLI from its flags, or by keywords in a notebook — and passed to
the verb whole. Every field has a default, so ``BakeOptions(strengths=[1.0], out="out/x")`` is a
complete bake. The model, the recipe or maps, ``log`` and ``progress`` stay the verb's own arguments:
what is baked and how the verb reports, not how.

A low floor: it imports only the budget, fold and placement types, so every module above can take these."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .evaluation.budget import Budget
from .fold import FoldOptions
from .placement import Placement


def _path(p) -> Path | None:
    return None if p is None else Path(p)


def _tuple(xs) -> tuple | None:
    return None if xs is None else tuple(xs)


@dataclass(frozen=True)
class BakeOptions:
    """How ``pipeline.bake`` bakes.

    ``strengths``: one λ per checkpoint (several: a ``lambda-*`` sub-directory each), or with composed
    recipes one per recipe; ``None``: the recipe's default (1.0 for a maps file). ``out``: the output
    directory (or ``X.gguf`` for a GGUF source); ``dry_run`` plans only. ``targets``, ``shift_policy``
    (``None``: the recipe's) and ``allow_flags`` merge with the recipe into ``fold.FoldOptions``
    (``fold_options``). ``revision``, ``placement``: how the model is loaded. After the write:
    ``evaluate_after`` (a table in the card, evaluated before the write), ``verify_after`` (a fresh
    process), ``push_to_hub`` (a repo id; implies verifying), ``private``. ``as_llama``: a Mistral
    checkpoint in the Llama layout. ``tune_budget`` (an ``evaluation.budget.Budget``): ``--strength auto``, the λ
    ``actmerge tune`` recorded within it (tuned after the fit if none is)."""

    strengths: tuple[float, ...] | None = None
    out: Path | None = None
    force: bool = False
    dry_run: bool = False
    targets: frozenset[str] = frozenset()
    shift_policy: str | None = None
    allow_flags: bool = True
    revision: str | None = None
    placement: Placement | None = None
    evaluate_after: bool = False
    verify_after: bool = False
    push_to_hub: str | None = None
    private: bool = False
    as_llama: bool = False
    allow_extrapolation: bool = False
    tune_budget: Any = None  # an evaluation.budget.Budget

    def __post_init__(self):
        object.__setattr__(self, "strengths", _tuple(self.strengths))
        object.__setattr__(self, "out", _path(self.out))
        object.__setattr__(self, "targets", frozenset(self.targets))

    def fold_options(self, recipe=None) -> FoldOptions:
        """These fold choices merged with the recipe's (``FoldOptions.merged``)."""
        return FoldOptions.merged(
            recipe, targets=self.targets, shift_policy=self.shift_policy, allow_config_change=self.allow_flags
        )


@dataclass(frozen=True)
class VerifyOptions:
    """How ``pipeline.verify`` checks a checkpoint. ``strength`` (``None``: the bake's, from
    ``actmerge/bake.json``); ``tolerance`` (``None``: by dtype, or the base's own round trip for
    llama.cpp); ``prompts`` (``None``: the built-in ones); ``placement`` of the base; ``runtime``:
    ``transformers`` (a fresh process) or ``llama.cpp`` (GGUF round trips, ``outtype``); ``fresh``
    (pipelines): the baked pipeline in a fresh process."""

    strength: float | None = None
    tolerance: float | None = None
    prompts: tuple[str, ...] | None = None
    placement: Placement | None = None
    runtime: str = "transformers"
    outtype: str = "f32"
    fresh: bool = True

    def __post_init__(self):
        object.__setattr__(self, "prompts", _tuple(self.prompts))


@dataclass(frozen=True)
class EvalOverrides:
    """Evaluation settings given explicitly (``--prompts``, ``--metrics``, …); each one left ``None``
    (``sample``, ``chat``: ``False``) comes from the recipe (``evaluation.settings.eval_config``)."""

    prompts: tuple[str, ...] | None = None
    neutral: tuple[str, ...] | None = None
    metrics: tuple[str, ...] | None = None
    scorer: str | None = None
    keywords: tuple[str, ...] | None = None
    max_new_tokens: int | None = None
    sample: bool = False
    seed: int | None = None
    limit: int | None = None
    chat: bool = False

    def __post_init__(self):
        for name in ("prompts", "neutral", "metrics", "keywords"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))


@dataclass(frozen=True)
class EvalOptions:
    """How ``pipeline.evaluate`` sweeps. ``strengths``: hooked previews; ``baked``: checkpoint
    directories loaded by plain transformers; ``include_base``: a base row even with λ = 0 hooked;
    ``clamped``: ml-act's clamped rows after a Linear-AcT fit; ``out``: the report directory
    (``force``: replace an eval or tune report there); ``settings``: explicit evaluation settings over
    the recipe's; ``lm_eval``: lm-evaluation-harness tasks (``lm_eval_include``: a directory of task
    YAMLs, ``lm_eval_limit``: documents per task) on the base and each baked directory."""

    strengths: tuple[float, ...] = ()
    baked: tuple[Path, ...] = ()
    out: Path | None = None
    force: bool = False
    include_base: bool = False
    clamped: bool = True
    settings: EvalOverrides = field(default_factory=EvalOverrides)
    revision: str | None = None
    placement: Placement | None = None
    allow_extrapolation: bool = False
    lm_eval: tuple[str, ...] = ()
    lm_eval_include: Path | None = None
    lm_eval_limit: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "strengths", tuple(self.strengths))
        object.__setattr__(self, "baked", tuple(Path(b) for b in self.baked))
        object.__setattr__(self, "out", _path(self.out))
        object.__setattr__(self, "lm_eval", tuple(self.lm_eval))
        object.__setattr__(self, "lm_eval_include", _path(self.lm_eval_include))


@dataclass(frozen=True)
class TuneOptions:
    """How ``evaluation.tune.tune`` searches. ``budget``: the cost allowed (``None``: ``Budget()``); the grid runs
    up to ``max_strength`` in steps of ``step``, then bisection to ``tol`` (``evaluation.search.check_search`` bounds
    them; beyond λ = 4 only with ``allow_extrapolation``). ``curve``: the behaviour at every grid point
    (``False``: only at λ = 0 and the choice). ``out``: the report directory (tune.json, tune.png;
    ``None``: none; ``force``: replace an eval or tune report there). ``record``: remember the choice for
    ``bake --strength auto``."""

    budget: Budget | None = None
    max_strength: float = 2.0
    step: float = 0.25
    tol: float = 0.02
    allow_extrapolation: bool = False
    curve: bool = True
    out: Path | None = None
    force: bool = False
    record: bool = True

    def __post_init__(self):
        object.__setattr__(self, "out", _path(self.out))
