"""The pipeline verbs as a library call: fit (from a recipe) or load maps, plan the fold at each
strength, write the baked pipeline with its provenance (recipe, maps, bake.json, model card)."""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__, card
from ..checkpoint import PROVENANCE_DIR, check_output
from ..errors import MapsMismatchError, RecipeError
from ..maps import MapSet
from ..recipes_catalog import find_recipe
from .collect import fit_pipeline
from .plan import PipelinePlan, ShiftPolicy, plan
from .recipe import DiffusionRecipe, load_diffusion_recipe
from .source import PipelineSource, resolve_pipeline
from .write import write_pipeline


@dataclass
class PipelineBakeResult:
    out: Path | None
    strength: float
    plan: PipelinePlan
    seconds: float
    notes: list[str] = field(default_factory=list)


def held_maps(maps: MapSet, fold_plan: PipelinePlan) -> MapSet:
    """The maps the pipeline really holds: shifts the plan dropped are zero."""
    dropped = {sp.site.key for sp in fold_plan.sites if sp.exactness.startswith("scale only")}
    out = {k: (m.scale_only() if k in dropped else m) for k, m in maps.items()}
    return MapSet(out, maps.base_model, maps.method, maps.recipe_hash, dict(maps.extra))


def bake_pipeline(
    source: str | Path | PipelineSource,
    *,
    recipe: str | Path | DiffusionRecipe | None = None,
    maps: str | Path | MapSet | None = None,
    strengths: list[float] | None = None,
    out: str | Path | None = None,
    shift_policy: ShiftPolicy | None = None,
    force: bool = False,
    dry_run: bool = False,
    revision: str | None = None,
    device: str | None = None,
    log=print,
    pipe=None,
) -> list[PipelineBakeResult]:
    """Bake maps into a diffusers pipeline; one output directory per strength (``out/lambda-λ``
    when there are several)."""
    if (recipe is None) == (maps is None):
        raise RecipeError("give exactly one of a recipe (to fit) or a maps file (already fitted).")
    src = source if isinstance(source, PipelineSource) else resolve_pipeline(source, revision)
    recipe_obj = None
    if isinstance(recipe, str | Path):  # a file, or a built-in recipe's name
        recipe = find_recipe(recipe, log=log)
    if recipe is not None:
        recipe_obj = recipe if isinstance(recipe, DiffusionRecipe) else load_diffusion_recipe(recipe)
    strengths = strengths or [recipe_obj.strength if recipe_obj else 1.0]
    policy = shift_policy or (recipe_obj.diffusion.shift_policy if recipe_obj else "error")
    for lam in strengths:
        if lam < 0:
            raise RecipeError(
                f"strength {lam} < 0: use 0 (identity) to 1 (full transport), or >1 to extrapolate."
            )
        if lam > 1:
            warnings.warn(f"strength {lam} > 1 extrapolates the transport.", stacklevel=2)
    if not dry_run:
        if out is None:
            raise RecipeError("give an output directory with -o/--out (or --dry-run to only print the plan).")
        for lam in strengths:
            check_output(_out_for(Path(out), lam, strengths), src.path, force)
    if recipe_obj is not None:
        mapset = fit_pipeline(src, recipe_obj, pipe=pipe, device=device, log=log).maps
    else:
        mapset = maps if isinstance(maps, MapSet) else MapSet.load(maps)
        if not mapset.maps:
            raise MapsMismatchError("the maps file holds no maps.")
    results = []
    for lam in strengths:
        t0 = time.perf_counter()
        fold_plan = plan(src, mapset, lam, shift_policy=policy)
        res = PipelineBakeResult(None, lam, fold_plan, 0.0)
        dropped = [sp for sp in fold_plan.sites if sp.exactness.startswith("scale only")]
        if dropped:
            res.notes.append(f"shift dropped at {len(dropped)} sites (no bias to take it): scales baked only")
        if not dry_run:
            held = held_maps(mapset, fold_plan)
            extra = provenance(
                src, held, fold_plan, recipe_obj, recipe if isinstance(recipe, str | Path) else None
            )
            res.out, skipped = write_pipeline(
                src, fold_plan, _out_for(Path(out), lam, strengths), extra=extra, force=force
            )
            if skipped:
                res.notes.append(f"left out stale weight files of edited components: {', '.join(skipped)}")
        res.seconds = time.perf_counter() - t0
        results.append(res)
    return results


def _out_for(out: Path, lam: float, strengths: list[float]) -> Path:
    return out if len(strengths) == 1 else out / f"lambda-{lam:g}"


def provenance(
    src: PipelineSource, maps: MapSet, fold_plan: PipelinePlan, recipe: DiffusionRecipe | None, recipe_path
) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as d:
        maps_bytes = maps.save(Path(d) / "maps.safetensors").read_bytes()
    rows = fold_plan.rows()
    edited = sorted(c for c, mods in fold_plan.edits.items() if mods)
    info = {
        "actmerge_version": __version__,
        "kind": "diffusers-pipeline",
        "base_model": src.name,
        "base_path": str(src.path),  # where verify finds the base (a Hub snapshot or local directory)
        "revision": src.revision,
        "pipeline_class": src.pipeline_class,
        "strength": fold_plan.strength,
        "method": maps.method,
        "recipe_hash": maps.recipe_hash,
        "edited_components": edited,
        "fold": rows,
    }
    extra = {
        f"{PROVENANCE_DIR}/maps.safetensors": maps_bytes,
        f"{PROVENANCE_DIR}/bake.json": (json.dumps(info, indent=2) + "\n").encode(),
        "README.md": model_card(src, maps, fold_plan, edited, recipe).encode(),
    }
    if recipe_path is not None:
        extra[f"{PROVENANCE_DIR}/recipe.yaml"] = Path(recipe_path).read_bytes()
    elif recipe is not None:
        extra[f"{PROVENANCE_DIR}/recipe.yaml"] = recipe.to_yaml().encode()
    return extra


def model_card(
    src: PipelineSource,
    maps: MapSet,
    fold_plan: PipelinePlan,
    edited: list[str],
    recipe: DiffusionRecipe | None,
) -> str:
    import yaml

    hub_id = card.hub_base_model(src.name)
    method = maps.method or "unknown"
    name = maps.extra.get("recipe", "custom")
    license_ = card.base_license(src.path, {})
    front = {
        **({"base_model": hub_id, "base_model_relation": "finetune"} if hub_id else {}),
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "tags": list(dict.fromkeys(["actmerge", "activation-steering", "steering", method, name])),
        "license": license_ or "other",
    }
    active = [r for r in fold_plan.rows() if r["class"] != "identity"]
    sites = sorted({r["site"].split("[")[0] for r in active})
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {src.name.rstrip('/').split('/')[-1]} — {name} (actmerge, λ = {fold_plan.strength:g})",
        "",
        f"This pipeline is **{src.name}** ({src.pipeline_class}) with activation steering baked into the "
        f"weights of {', '.join(edited) or 'no component'} by actmerge {__version__}. It loads in plain "
        "diffusers (no actmerge, no hooks) and runs at the base pipeline's speed; the other components are "
        "byte-identical copies.",
        "",
    ]
    if recipe is not None and recipe.description:
        lines += [recipe.description.strip(), ""]
    lines += [
        "## How it was steered",
        "",
        f"- method: `{method}` (per-channel affine maps `T(a) = ω·a + β`, fitted at the first denoising step)",
        f"- strength: λ = {fold_plan.strength:g} (the model sees `(1−λ+λω)·a + λβ` at every step)",
        f"- sites: {', '.join(sites) or 'none'} ({len(active)} active maps)",
        "",
        "Maps (`actmerge/maps.safetensors`), recipe and fold report (`actmerge/bake.json`) are included.",
        "Quality on this pipeline was not measured by actmerge: check images before and after.",
        "",
        "## Use",
        "",
        "```python",
        "import torch",
        "from diffusers import DiffusionPipeline",
        f'pipe = DiffusionPipeline.from_pretrained("{card.REPO_PLACEHOLDER}", torch_dtype=torch.float16)',
        "```",
        "",
    ]
    return "\n".join(lines)
