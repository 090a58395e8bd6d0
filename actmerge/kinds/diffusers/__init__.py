"""Text-to-image diffusion: steering maps baked into diffusers pipelines (docs/design.md §8).

What is specific to pipelines lives here: the component and pipeline rows (``table``), site
resolution (``sites``), first-step collection (``collect``), the placement of maps into components
(``plan``, which returns the shared ``fold.FoldPlan``) and the pipeline verification (``verify``).
The verbs (``actmerge.pipeline.fit|bake|verify|sites``) take a pipeline like a language model;
writing goes through ``actmerge.io``. diffusers is imported only when a pipeline is loaded.
"""

from .collect import fit_pipeline
from .source import PipelineSource, is_pipeline, resolve_pipeline
from .verify import PipelineVerifyReport, verify_pipeline

__all__ = [
    "PipelineSource",
    "PipelineVerifyReport",
    "fit_pipeline",
    "is_pipeline",
    "resolve_pipeline",
    "verify_pipeline",
]
