"""The diffusers-pipeline kind: a pipeline directory (or Hub repo with ``model_index.json``), steered
by hooks on its components and baked into a new pipeline directory whose unedited components are
byte-identical copies."""

from __future__ import annotations

from pathlib import Path

from ...errors import MapsMismatchError, PlacementError, RecipeError
from ...fold import FoldOptions, FoldPlan
from ...io.st_format import tensor_index
from ...io.tree import write_pipeline
from ...maps import MapSet
from ...placement import Placement
from ...recipe import Recipe
from ..base import FitRequest, FitResult, ModelKind, VerifyRequest
from . import card
from .collect import fit_pipeline, recipe_sites
from .hooks import steer
from .plan import capabilities, plan
from .recipe import load_diffusion_recipe
from .source import PipelineSource, resolve_pipeline
from .verify import verify_pipeline


class Pipelines(ModelKind):
    name = "pipeline"

    def owns(self, model) -> bool:
        return isinstance(model, PipelineSource)

    def resolve(self, model, *, revision, placement=None, log=print) -> PipelineSource:
        return model if isinstance(model, PipelineSource) else resolve_pipeline(model, revision)

    def source_of(self, target: PipelineSource) -> PipelineSource:
        return target

    def language_model(self, target: PipelineSource) -> None:
        return None

    def load_recipe(self, recipe, log) -> Recipe:
        return recipe if isinstance(recipe, Recipe) else load_diffusion_recipe(recipe)

    def bake_target(self, model, options, fold, n_recipes, log) -> PipelineSource:
        o = options
        given = {"--target": bool(fold.targets), "--as-llama": o.as_llama, "--eval": o.evaluate_after}
        given |= {"--push-to-hub": bool(o.push_to_hub), "--no-flags": not o.allow_flags}
        given |= {"composed recipes": n_recipes > 1}
        if any(given.values()):
            raise RecipeError(
                f"{', '.join(k for k, v in given.items() if v)}: not available for diffusers pipelines."
            )
        return self.resolve(model, revision=o.revision)

    def preflight_maps(self, maps: MapSet, source, log) -> None:
        return None  # a pipeline's maps are checked against its components by ``plan``

    def preflight_checkpoint(self, source) -> None:
        return None  # a pipeline's weight sets are read (and checked) by the plan and the writer

    def writes_gguf(self, out: Path | None) -> bool:
        return False

    def fit(self, model, recipe: Recipe, request: FitRequest) -> FitResult:
        placement = request.placement or Placement()
        if placement.dispatched:
            raise PlacementError(
                "--device-map/--max-memory/--offload-folder are for LLMs; pipelines load whole."
            )
        source = self.resolve(model, revision=request.revision)
        res = fit_pipeline(source, recipe, pipe=request.pipe, device=placement.device, log=request.log)
        return FitResult(res.maps, None, recipe, res.seconds)

    def recipe_sites(self, source, recipe: Recipe) -> list:
        return recipe_sites(source, recipe)

    def plan(self, source, maps: MapSet, strength: float, options: FoldOptions) -> FoldPlan:
        return plan(source, maps, strength, options)

    def steer(self, model, maps: MapSet, strength: float):
        return steer(model, maps, strength)

    def deviation(self, target, full: MapSet, held: MapSet, strength: float) -> None:
        return None  # not measured for pipelines: the dropped shifts are listed in the notes

    def edited_components(self, fold_plan: FoldPlan) -> list[str]:
        return [c for c in fold_plan.components() if c]

    def card_text(self, info, source):
        return card.text(info)

    def license(self, source) -> str | None:
        return card.license_of(source)

    def write(self, source, fold_plan: FoldPlan, out: Path, extra: dict[str, bytes], job) -> list[str]:
        edits = {c: fold_plan.weight_edits(c) for c in fold_plan.components()}
        weights = {c: source.weight_sets(c) for c in edits}
        check_variants(fold_plan, weights)
        return write_pipeline(
            source.path, weights, edits, out, extra=extra, force=job.options.force, log=job.log
        )

    def default_base(self, info) -> str:
        local = info.base_path
        return local if local and Path(local).is_dir() else info.base_model

    def verify(self, checkpoint: Path, base, maps: MapSet, strength: float, how: VerifyRequest):
        o, info = how.options, how.info
        return verify_pipeline(
            checkpoint,
            base=self.resolve(base, revision=info.revision if info else None),
            maps=maps,
            strength=strength,
            tolerance=o.tolerance,
            prompts=list(o.prompts) if o.prompts is not None else None,
            device=(o.placement or Placement()).device,
            pipe=how.pipe,
            fresh=o.fresh,
        )

    def capabilities(self, model, targets, revision, log) -> tuple[str, list[dict]]:
        source = self.resolve(model, revision=revision)
        return f"{model}: {source.pipeline_class}", capabilities(source)


def check_variants(fold_plan: FoldPlan, weights: dict) -> None:
    """Every weight set of an edited component (e.g. an ``.fp16`` variant) must hold the edited tensors."""
    for component, sets in weights.items():
        edited = fold_plan.edited_tensors(component)
        for ws in sets:
            infos, _ = tensor_index(ws.files)
            missing = [t for t in edited if t not in infos]
            if missing:
                raise MapsMismatchError(
                    f"{component}/{ws.files[0].name}: tensors {missing[:3]} are missing from this weight set (a "
                    "variant with other tensor names?); remove the variant or bake it separately."
                )


PIPELINES = Pipelines()
