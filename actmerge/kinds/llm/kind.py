"""The language-model kind: a transformers checkpoint (or a built-in model's snapshot), steered by
hooks on its modules and baked into a new checkpoint directory (or a GGUF file)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ... import gguf_bake
from ...card import has_chat_template
from ...fold import FoldOptions, FoldPlan
from ...io.st_format import tensor_index
from ...io.tree import write_checkpoint
from ...maps import MapSet
from ...models import ModelSource, resolve
from ...progress import bar
from ...recipe import Recipe, load_recipe
from ...shifts import capabilities
from ...sites import architecture_for
from ..base import FitRequest, FitResult, ModelKind, VerifyRequest
from . import card
from . import fit as fitting
from .hooks import steer
from .plan import plan
from .source import Loaded, load
from .verify import DEFAULT_PROMPTS, VerifyReport, compare, hooked_outputs, verify_checkpoint


class LanguageModels(ModelKind):
    name = "llm"

    def owns(self, model) -> bool:
        return isinstance(model, Loaded | ModelSource)

    def resolve(self, model, *, revision, placement, log) -> Loaded:
        return load(model, revision=revision, placement=placement, log=log)

    def source_of(self, target: Loaded):
        return target.source

    def language_model(self, target: Loaded) -> Loaded:
        return target

    def load_recipe(self, recipe, log) -> Recipe:
        return recipe if isinstance(recipe, Recipe) else load_recipe(recipe, log=log)

    def bake_target(self, model, options, fold, n_recipes, log) -> Loaded:
        """Resolved (not loaded); ``options.as_llama``: a Mistral checkpoint written in the Llama layout,
        refused (not Mistral, a binding sliding window) before the fit."""
        loaded = load(model, revision=options.revision, placement=options.placement, log=log)
        if options.as_llama:
            from ...llama_layout import LlamaLayout, as_llama_config

            src = loaded.source
            as_llama_config(src.config)
            loaded = replace(loaded, source=LlamaLayout(src.name, src.path, src.revision))
        return loaded

    def preflight_maps(self, maps: MapSet, source, log) -> None:
        fitting.preflight_maps(maps, source, log)

    def preflight_checkpoint(self, source) -> None:
        fitting.preflight_checkpoint(source)

    def writes_gguf(self, out: Path | None) -> bool:
        return gguf_bake.is_gguf_out(out)

    def fit(self, model, recipe: Recipe, request: FitRequest) -> FitResult:
        return fitting.fit(model, recipe, request)

    def recipe_sites(self, source, recipe: Recipe) -> list:
        return fitting.recipe_sites(recipe, source.config)

    def plan(self, source, maps: MapSet, strength: float, options: FoldOptions) -> FoldPlan:
        infos, _ = tensor_index(source.safetensors_files())
        return plan(architecture_for(source.config), source.config, maps, strength, infos, options)

    def steer(self, model, maps: MapSet, strength: float):
        return steer(model, maps, strength)

    def deviation(self, target: Loaded, full: MapSet, held: MapSet, strength: float) -> VerifyReport:
        """Max |Δlogit| and top-1 agreement of the baked maps (``held``) vs the ``full`` maps, hooked."""
        model, tok = target.get()
        ref = hooked_outputs(model, tok, DEFAULT_PROMPTS, full, strength)
        got = hooked_outputs(model, tok, DEFAULT_PROMPTS, held, strength)
        return compare(ref, got, float("inf"))

    def edited_components(self, fold_plan: FoldPlan) -> list[str]:
        return []

    def card_text(self, info, source):
        return card.text(info, chat=has_chat_template(source.path))

    def license(self, source) -> str | None:
        return card.license_of(source)

    def write(self, source, fold_plan: FoldPlan, out: Path, extra: dict[str, bytes], job) -> list[str]:
        write_checkpoint(
            source.path,
            source.safetensors_files(),
            fold_plan.weight_edits(),
            out,
            config_patch=fold_plan.config_patch,
            extra=extra,
            force=job.options.force,
            progress=bar if job.progress else None,
            log=job.log,
        )
        return []

    def default_base(self, info) -> str:
        return info.base_model

    def verify(self, checkpoint: Path, base, maps: MapSet, strength: float, how: VerifyRequest):
        o, info, log = how.options, how.info, how.log
        loaded = load(base, revision=info.revision if info else None, placement=o.placement, log=log)
        fitting.preflight_maps(maps, loaded.source, log)
        return verify_checkpoint(
            checkpoint,
            loaded,
            maps,
            strength,
            tolerance=o.tolerance,
            prompts=list(o.prompts) if o.prompts is not None else None,
            runtime=o.runtime,
            outtype=o.outtype,
            progress=how.progress,
            log=log,
        )

    def capabilities(self, model, targets, revision, log) -> tuple[str, list[dict]]:
        config = resolve(model, revision, log=log).config
        arch = architecture_for(config)
        return f"{model}: {arch.name}", capabilities(arch, config, frozenset(targets))


LANGUAGE_MODELS = LanguageModels()
