"""Diffusion recipes: the LLM recipe plus a ``diffusion:`` block (unknown keys still rejected).

Sites are diffusion site names (``text_attn_in``, ``unet_resnet_norm1``, ``dit_attn_in`` …),
optionally restricted to one component (``text_encoder_2/text_attn_in``); ``layers:`` selects
blocks of the site's kind in forward order. ``modules:`` takes raw ``component/module:side`` keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError

from ..errors import RecipeError
from ..recipe import Recipe, _Strict, read_sentences


class DiffusionOptions(_Strict):
    """The ml-act collection protocol: statistics at the first denoising step."""

    steps: int = Field(30, gt=0, description="scheduler steps; only the first is run to collect statistics")
    guidance_scale: float | None = Field(
        None, description="the pipeline's guidance (None: its default); the conditional half is kept"
    )
    height: int | None = Field(None, gt=0, description="image height (None: the pipeline's default)")
    width: int | None = Field(None, gt=0, description="image width (None: the pipeline's default)")
    pixel_samples: int = Field(
        64, ge=0, description="denoiser sites: image positions sampled per prompt (0: every position)"
    )
    feature_maps: Literal["per_channel", "per_pixel", "spatial_mean"] = Field(
        "per_channel",
        description="4-D maps: per_channel folds into GroupNorm; per_pixel and spatial_mean cannot be baked",
    )
    shift_policy: Literal["error", "drop"] = Field(
        "error", description="shifts with no bias to go into: refuse (error) or bake the scales only (drop)"
    )


class DiffusionRecipe(Recipe):
    diffusion: DiffusionOptions = Field(default_factory=DiffusionOptions)


def load_diffusion_recipe(path: str | Path) -> DiffusionRecipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist; see recipes/diffusion-*.yaml for examples.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping (name:, method:, sites:, source:, target: …).")
    try:
        recipe = DiffusionRecipe(**data)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise RecipeError(f"{path} is not a valid diffusion recipe:\n" + "\n".join(lines)) from None
    recipe._base_dir = path.resolve().parent
    if not recipe.sites and not recipe.modules:
        raise RecipeError(f"{path}: give at least one site under `sites:` (or raw `modules:`).")
    if recipe.method == "lineas":
        raise RecipeError(
            f"{path}: method lineas is not available for diffusion pipelines (its end-to-end loss would need "
            "gradients through the denoising step); use linear_act, mean_act or gaussian_act."
        )
    if recipe.incremental:
        raise RecipeError(
            f"{path}: incremental fitting is not implemented for pipelines; set incremental: false."
        )
    for p in (recipe.source, recipe.target):
        read_sentences(recipe.path(p), recipe.text_field)
    return recipe
