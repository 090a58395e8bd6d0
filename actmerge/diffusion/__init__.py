"""Text-to-image diffusion: bake steering maps into diffusers pipelines (DESIGN.md §8).

``bake_pipeline`` (fit or load maps, fold, write), ``verify_pipeline`` (hooked base vs the baked
pipeline in plain diffusers), ``fit_pipeline`` (ml-act first-step statistics). diffusers is
imported only when a pipeline is loaded.
"""

from .bake import PipelineBakeResult, bake_pipeline
from .collect import fit_pipeline
from .source import PipelineSource, is_pipeline, resolve_pipeline
from .verify import PipelineVerifyReport, verify_pipeline

__all__ = [
    "PipelineBakeResult",
    "PipelineSource",
    "PipelineVerifyReport",
    "bake_pipeline",
    "fit_pipeline",
    "is_pipeline",
    "resolve_pipeline",
    "verify_pipeline",
]
