"""The fit verb: collect activations on a recipe's two sentence sets and fit one map per site
(Linear-AcT family, or LinEAS end to end), for any kind of model (``kinds``: a language model or a
diffusers pipeline). Also where a model argument becomes the kind's resolved handle."""

from __future__ import annotations

from pathlib import Path

from .fold import FoldOptions
from .kinds.base import FitRequest, FitResult  # noqa: F401  (FitResult: the library API)
from .kinds.llm.fit import preflight_maps  # noqa: F401  (a maps file checked against a language model)
from .kinds.llm.source import Loaded, load  # noqa: F401  (the library API)
from .kinds.registry import kind_of
from .placement import Placement
from .recipe import Recipe, check_sentence_counts


def resolved(model, *, revision: str | None = None, placement: Placement | None = None, log=print):
    """The model argument resolved, not loaded: a ``Loaded`` (language model) or a ``PipelineSource``.
    Cheap after the first use of a built-in model; ``fit`` and the verbs accept either."""
    return kind_of(model, revision).resolve(model, revision=revision, placement=placement, log=log)


def source_path(model) -> Path:
    """The directory a resolved model (``resolved``) is read from: no output may touch it."""
    return kind_of(model).source_of(model).path


def preflight_recipe(recipe: Recipe, log=print) -> None:
    """Before any model load: the sentence files decode and hold enough sentences."""
    n_src = len(recipe.read_source()[: recipe.max_sentences])
    n_tgt = len(recipe.read_target()[: recipe.max_sentences])
    check_sentence_counts(n_src, n_tgt, recipe.min_sentences, log)


def fit(
    model,
    recipe: str | Path | Recipe,
    *,
    revision: str | None = None,
    placement: Placement | None = None,
    options: FoldOptions | None = None,
    progress: bool = True,
    log=print,
    pipe=None,
) -> FitResult:
    """Collect activations on the recipe's sentences and fit one map per site (LinEAS: end to end,
    freezing the shifts the fold plan cannot bake under ``options``)."""
    kind = kind_of(model, revision)
    recipe = kind.load_recipe(recipe, log)
    options = options or FoldOptions.merged(recipe)
    preflight_recipe(recipe, log)
    request = FitRequest(revision, placement, options, progress, log, pipe)
    return kind.fit(model, recipe, request)
