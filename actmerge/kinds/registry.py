"""The one place that decides which kind a model argument is (``kind_of``), and the kinds by the name
``bake.json`` records (``KINDS``)."""

from __future__ import annotations

from pathlib import Path

from ..io.provenance import read_bake_info
from .base import ModelKind
from .diffusers.kind import PIPELINES
from .diffusers.source import is_pipeline
from .llm.kind import LANGUAGE_MODELS

KINDS: dict[str, ModelKind] = {k.name: k for k in (LANGUAGE_MODELS, PIPELINES)}


def kind_of(model, revision: str | None = None) -> ModelKind:
    """The kind of ``model``: a handle a kind owns (``Loaded``, ``ModelSource``, ``PipelineSource``);
    a directory actmerge baked (its ``bake.json``); a directory with ``model_index.json`` or a Hub repo
    whose root has one is a pipeline; everything else is a language model."""
    for kind in KINDS.values():
        if kind.owns(model):
            return kind
    info = read_bake_info(model) if Path(str(model)).is_dir() else None
    if info is not None:
        return KINDS[info.kind]
    return PIPELINES if is_pipeline(str(model), revision) else LANGUAGE_MODELS
