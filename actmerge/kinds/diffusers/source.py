"""Resolve a diffusers pipeline (local directory with ``model_index.json``, or a Hub id) and read
its components' safetensors headers. Nothing here loads a model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ...errors import ModelResolutionError
from ...io.st_format import TensorInfo, tensor_index
from ...io.tree import WeightSet, read_config
from ...models import hub_fetch

MODEL_INDEX = "model_index.json"


@dataclass(frozen=True)
class PipelineSource:
    name: str  # what the user gave
    path: Path
    revision: str | None = None

    @cached_property
    def model_index(self) -> dict:
        return read_config(self.path / MODEL_INDEX)

    @property
    def pipeline_class(self) -> str:
        return self.model_index.get("_class_name", "")

    @cached_property
    def components(self) -> dict[str, str]:
        """component folder → class name, for entries that hold a model (library, class)."""
        out = {}
        for name, value in self.model_index.items():
            if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[1] is None:
                continue
            out[name] = value[1]
        return out

    def library(self, component: str) -> str:
        return self.model_index[component][0]

    @cached_property
    def _modules(self) -> dict[str, frozenset[str]]:
        return {}

    def modules(self, component: str) -> frozenset[str]:
        """``named_modules()`` paths of the component's class as this diffusers/transformers builds
        it (instantiated from its config without memory). Site keys use these paths: they are what
        hooks attach to, and they may differ from tensor names (transformers 5 builds CLIPTextModel
        without ``text_model.``; older checkpoints name its tensors with it)."""
        if component not in self._modules:
            self._modules[component] = frozenset(_empty_model_modules(self, component))
        return self._modules[component]

    def weight_sets(self, component: str) -> list[WeightSet]:
        folder = self.path / component
        sets, indexed = [], set()
        for index in sorted(folder.glob("*.safetensors.index.json")):
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            sets.append(WeightSet(tuple(folder / f for f in files), index))
            indexed |= set(files)
        for f in sorted(folder.glob("*.safetensors")):
            if f.name not in indexed:
                sets.append(WeightSet((f,)))
        # the default (non-variant) set first: its names and shapes are what plans are checked against
        sets.sort(key=lambda s: _variant(s) != "")
        return sets

    @cached_property
    def _headers(self) -> dict[str, dict[str, TensorInfo]]:
        return {}

    def tensors(self, component: str) -> dict[str, TensorInfo]:
        """Tensor names, shapes and dtypes of the component's default weight set (cached)."""
        if component not in self._headers:
            self._headers[component] = self._read_tensors(component)
        return self._headers[component]

    def _read_tensors(self, component: str) -> dict[str, TensorInfo]:
        sets = self.weight_sets(component)
        if not sets:
            raise ModelResolutionError(
                f"{self.path / component} has no safetensors weights; actmerge rewrites safetensors only. "
                "Load the pipeline in diffusers and save_pretrained(..., safe_serialization=True) first."
            )
        infos, _ = tensor_index(sets[0].files)
        return infos


def _empty_model_modules(source: PipelineSource, component: str) -> list[str]:
    import importlib

    from accelerate import init_empty_weights

    folder = source.path / component
    library, cls_name = source.library(component), source.components[component]
    try:
        cls = getattr(importlib.import_module(library), cls_name)
        with init_empty_weights():
            if library == "transformers":
                from transformers import AutoConfig

                model = cls(AutoConfig.from_pretrained(folder))
            else:
                model = cls.from_config(cls.load_config(folder))
    except (ImportError, AttributeError, OSError, ValueError) as exc:
        raise ModelResolutionError(
            f"cannot build {library}.{cls_name} from {folder}/config: {exc}. Update {library}, or check the "
            "component's config.json."
        ) from exc
    return [name for name, _ in model.named_modules()]


def _variant(ws: WeightSet) -> str:
    """``fp16`` for ``diffusion_pytorch_model.fp16.safetensors`` (and its shards), else ''."""
    stem = ws.files[0].name.split(".safetensors")[0]
    stem = stem.split("-0")[0]  # shard suffix -00001-of-00002
    parts = stem.split(".")
    return parts[1] if len(parts) > 1 else ""


def is_pipeline(spec: str | Path, revision: str | None = None) -> bool:
    """A local directory with model_index.json, or a Hub repo whose root has one."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return (path / MODEL_INDEX).is_file()
    text = str(spec)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        return False
    from huggingface_hub import file_exists, try_to_load_from_cache

    cached = try_to_load_from_cache(text, MODEL_INDEX, revision=revision)
    if isinstance(cached, str):
        return True
    try:  # one HEAD request
        return bool(file_exists(text, MODEL_INDEX, revision=revision))
    except Exception:  # offline, unreachable, gated, not found: not known as a pipeline, and the
        return False  # transformers path that handles the id next reports the real problem


def resolve_pipeline(spec: str | Path, revision: str | None = None) -> PipelineSource:
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / MODEL_INDEX).is_file():
            raise ModelResolutionError(
                f"{path} has no {MODEL_INDEX}: give a diffusers pipeline directory (save_pretrained output)."
            )
        return PipelineSource(str(spec), path.resolve())
    if path.exists() or str(spec).startswith((".", "/", "~")) or str(spec).count("/") != 1:
        raise ModelResolutionError(f"{spec!r} is neither a pipeline directory nor a Hub id (owner/name).")
    return PipelineSource(str(spec), _download(str(spec), revision), revision)


def _download(repo_id: str, revision: str | None) -> Path:
    """The pipeline's files from the Hub (diffusers' own selection: safetensors, no variants)."""

    def fetch() -> str:
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.download(repo_id, revision=revision, use_safetensors=True)

    return hub_fetch(repo_id, fetch, what="pipeline")
