"""Whole output directories: a baked checkpoint, or a baked diffusers pipeline (one weight-set
rewrite per edited component). Everything that is not rewritten is copied verbatim; everything goes
through ``output.atomic_dir``."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointFormatError
from .output import PROVENANCE_DIR, atomic_dir
from .weights import WeightEdits, rewrite_weights

INDEX = "model.safetensors.index.json"
# other weight formats next to rewritten safetensors would go stale
STALE_WEIGHTS = (".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf", ".ckpt", ".onnx")


@dataclass(frozen=True)
class WeightSet:
    """One complete set of weights: a single file, or the shards an index names. A diffusers
    component may hold several (a float32 set and an ``.fp16`` variant); each is rewritten."""

    files: tuple[Path, ...]
    index: Path | None = None


def read_config(path: Path) -> dict:
    """A config.json, with a clear error for a missing or invalid one."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointFormatError(f"{path} is missing: give a Hugging Face model directory.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointFormatError(f"{path} is not valid JSON ({exc}): repair or re-download it.") from None
    if not isinstance(data, dict):
        raise CheckpointFormatError(f"{path} is not a JSON object: repair or re-download it.")
    return data


def _write_extra(dest: Path, extra: dict[str, bytes] | None) -> None:
    for rel, data in (extra or {}).items():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def copy_verbatim(source: Path, dest: Path, skip: Callable[[Path, Path], bool]) -> None:
    """Copy every file under ``source`` (symlinks resolved, hidden paths left out) unless
    ``skip(path, relative path)``."""
    for p in sorted(source.rglob("*")):
        rel = p.relative_to(source)
        if p.is_dir() or any(part.startswith(".") for part in rel.parts) or skip(p, rel):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, target)


def _patched_config(source: Path, dest: Path, patch: dict) -> None:
    if not patch:
        shutil.copyfile(source / "config.json", dest / "config.json")
        return
    config = read_config(source / "config.json")
    for dotted, value in patch.items():
        node = config
        *path, last = dotted.split(".")
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_checkpoint(
    source: Path,
    files: list[Path],
    edits: WeightEdits | None,
    out: Path,
    *,
    config_patch: dict | None = None,
    extra: dict[str, bytes] | None = None,
    force: bool = False,
    progress: Callable[[Iterable, int, str], AbstractContextManager[Iterable]] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """A baked checkpoint in ``out``: rewritten shards + index, config.json (patched only with the
    planned flags), tokenizer and the other files verbatim, and ``extra`` (provenance, card)."""

    def skip(p: Path, rel: Path) -> bool:
        if p.suffix == ".safetensors" or p.name in (INDEX, "config.json", "README.md"):
            return True
        return p.suffix in STALE_WEIGHTS or rel.parts[0] == PROVENANCE_DIR

    with atomic_dir(out, source=source, force=force, log=log) as tmp:
        rewrite_weights(files, tmp, edits, index=files[0].parent / INDEX, progress=progress)
        copy_verbatim(source, tmp, skip)
        _patched_config(source, tmp, config_patch or {})
        _write_extra(tmp, extra)
    return Path(out)


def write_pipeline(
    source: Path,
    weights: dict[str, list[WeightSet]],
    edits: dict[str, WeightEdits],
    out: Path,
    *,
    extra: dict[str, bytes] | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> list[str]:
    """A baked pipeline in ``out``: each component in ``edits`` has every weight set in
    ``weights[component]`` rewritten; other weight formats in an edited component would go stale
    and are left out (returned); every other file is copied verbatim."""
    rewritten: set[Path] = {f for c in edits for ws in weights[c] for f in ws.files}
    skipped: list[str] = []

    def skip(p: Path, rel: Path) -> bool:
        if p in rewritten or rel.parts[0] == PROVENANCE_DIR or rel.as_posix() == "README.md":
            return True
        if rel.parts[0] in edits and (
            p.suffix in STALE_WEIGHTS or p.name.endswith(".safetensors.index.json")
        ):
            if p.suffix in STALE_WEIGHTS:
                skipped.append(rel.as_posix())
            return True
        return False

    with atomic_dir(out, source=source, force=force, log=log) as tmp:
        for component, component_edits in sorted(edits.items()):
            (tmp / component).mkdir(parents=True, exist_ok=True)
            for ws in weights[component]:
                rewrite_weights(list(ws.files), tmp / component, component_edits)
        copy_verbatim(source, tmp, skip)
        _write_extra(tmp, extra)
    return skipped
