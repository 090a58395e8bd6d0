"""The model-kind interface: what the verbs (``pipeline``, ``fitting``, ``baking``) ask of a kind of
model — a language model (``kinds/llm``) or a diffusers pipeline (``kinds/diffusers``). Each kind
implements every operation once; ``kinds.kind_of`` picks the kind once per verb, and the verbs call
these methods instead of branching on the kind.

The terms: a *model argument* is what a user gives (a name, a path, a Hub id, or an already
resolved handle); a *target* is the kind's resolved handle (``Loaded`` for a language model, a
``PipelineSource`` for a pipeline: what ``fit`` and ``verify`` accept); its *source* is where its
files are read from (``source.path``, ``source.name``, ``source.revision``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..card import KindText
from ..fold import FoldOptions, FoldPlan
from ..maps import MapSet
from ..options import BakeOptions, VerifyOptions
from ..placement import Placement
from ..recipe import Recipe

Log = Callable[[str], None]


@dataclass
class FitResult:
    maps: MapSet
    report: Any  # collect.FitReport / lineas report (language models); None for pipelines
    recipe: Recipe
    seconds: float


@dataclass(frozen=True)
class FitRequest:
    """How ``ModelKind.fit`` fits: the model argument's revision and placement, the fold choices
    (what a shift may fold into), progress bars, the log, and an already loaded pipeline (``pipe``)."""

    revision: str | None = None
    placement: Placement | None = None
    options: FoldOptions = FoldOptions()
    progress: bool = True
    log: Log = print
    pipe: Any = None


class ModelKind(ABC):
    """One kind of model, end to end: resolve, fit, plan, steer, write, verify, describe."""

    name: str  # as recorded in ``bake.json`` (``BakeInfo.kind``)

    # ---- resolve ------------------------------------------------------------------------------
    @abstractmethod
    def owns(self, model: Any) -> bool:
        """Whether ``model`` is already this kind's resolved handle or source."""

    @abstractmethod
    def resolve(self, model: Any, *, revision: str | None, placement: Placement | None, log: Log) -> Any:
        """The model argument as this kind's target (cheap: nothing heavy is loaded yet)."""

    @abstractmethod
    def source_of(self, target: Any) -> Any:
        """Where ``target`` is read from (``.path``, ``.name``, ``.revision``)."""

    @abstractmethod
    def language_model(self, target: Any) -> Any:
        """The loaded language model behind ``target`` (``fitting.Loaded``), or None for a kind that
        has none (evaluation, tuning and the llama.cpp checks need one)."""

    @abstractmethod
    def load_recipe(self, recipe: str | Path | Recipe, log: Log | None) -> Recipe:
        """A recipe argument as this kind's validated recipe (a ``Recipe`` passes through)."""

    # ---- bake preflight -----------------------------------------------------------------------
    @abstractmethod
    def bake_target(
        self, model: Any, options: BakeOptions, fold: FoldOptions, n_recipes: int, log: Log
    ) -> Any:
        """The target of a bake, after refusing what this kind cannot bake (``options``, ``fold``,
        ``n_recipes`` composed recipes) before any slow work."""

    @abstractmethod
    def preflight_maps(self, maps: MapSet, source: Any, log: Log) -> None:
        """Before any model load: a given maps file fits this model."""

    @abstractmethod
    def preflight_checkpoint(self, source: Any) -> None:
        """Before any model load: the weight files are readable."""

    @abstractmethod
    def writes_gguf(self, out: Path | None) -> bool:
        """Whether a bake to ``out`` writes one GGUF file (``gguf_bake``) rather than a directory."""

    # ---- fit, plan, steer ---------------------------------------------------------------------
    @abstractmethod
    def fit(self, model: Any, recipe: Recipe, request: FitRequest) -> FitResult:
        """Collect activations on the recipe's sentences and fit one map per site."""

    @abstractmethod
    def recipe_sites(self, source: Any, recipe: Recipe) -> list:
        """The sites a recipe names on this model, in forward order."""

    @abstractmethod
    def plan(self, source: Any, maps: MapSet, strength: float, options: FoldOptions) -> FoldPlan:
        """Where each map folds at ``strength``: the shared ``fold.FoldPlan``."""

    @abstractmethod
    def steer(self, model: Any, maps: MapSet, strength: float) -> AbstractContextManager:
        """The maps applied by hooks (``model``: a torch model, or a pipeline's components)."""

    @abstractmethod
    def deviation(self, target: Any, full: MapSet, held: MapSet, strength: float) -> Any:
        """How far the maps the checkpoint holds (``held``: shifts dropped) are from the ``full`` maps,
        hooked; None where this kind does not measure it."""

    # ---- write ----------------------------------------------------------------------------------
    @abstractmethod
    def edited_components(self, fold_plan: FoldPlan) -> list[str]:
        """The components a bake edits (``bake.json``); [] for a single model."""

    @abstractmethod
    def card_text(self, info: Any, source: Any) -> KindText:
        """This kind's parts of the model card (``card.render``)."""

    @abstractmethod
    def license(self, source: Any) -> str | None:
        """The base model's license, as the card states it (None: unknown)."""

    @abstractmethod
    def write(
        self, source: Any, fold_plan: FoldPlan, out: Path, extra: dict[str, bytes], job: Any
    ) -> list[str]:
        """Write the baked model to ``out`` with ``extra`` files (provenance, card); ``job``: the
        ``baking.BakeJob`` (force, progress, log). Returns the files left out."""

    # ---- verify and describe ------------------------------------------------------------------
    @abstractmethod
    def default_base(self, info: Any) -> str:
        """The base a checkpoint records (``BakeInfo``), to verify against."""

    @abstractmethod
    def verify(self, checkpoint: Path, base: Any, maps: MapSet, strength: float, how: VerifyRequest) -> Any:
        """Hooked base vs the checkpoint reloaded without actmerge; writes ``actmerge/verify.json``."""

    @abstractmethod
    def capabilities(
        self, model: str, targets: frozenset[str], revision: str | None, log: Log
    ) -> tuple[str, list[dict]]:
        """(title, rows): where a scale and a shift fold, site by site (``actmerge sites MODEL``)."""


@dataclass(frozen=True)
class VerifyRequest:
    """How ``ModelKind.verify`` runs: the verb's options, the checkpoint's bake record (``info``,
    for the base's revision), progress, the log, and an already loaded pipeline (``pipe``)."""

    options: VerifyOptions
    info: Any = None
    progress: bool = True
    log: Log = print
    pipe: Any = None
