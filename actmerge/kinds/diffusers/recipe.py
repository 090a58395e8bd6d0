"""Diffusion recipes: the LLM recipe plus a ``diffusion:`` block (unknown keys still rejected).

Sites are diffusion site names (``text_attn_in``, ``unet_resnet_norm1``, ``dit_attn_in`` …),
optionally restricted to one component (``text_encoder_2/text_attn_in``); ``layers:`` selects
blocks of the site's kind in forward order. ``modules:`` takes raw ``component/module:side`` keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from ...errors import RecipeError
from ...recipe import Recipe, Strict, load_recipe


class DiffusionOptions(Strict):
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
    recipe = load_recipe(path, DiffusionRecipe, "diffusion recipe")
    if recipe.method == "lineas":
        raise RecipeError(
            f"{path}: method lineas is not available for diffusion pipelines (its end-to-end loss would need "
            "gradients through the denoising step); use linear_act, mean_act or gaussian_act."
        )
    if recipe.incremental:
        raise RecipeError(
            f"{path}: incremental fitting is not implemented for pipelines; set incremental: false."
        )
    return recipe
