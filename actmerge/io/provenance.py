"""Provenance written beside baked weights (``actmerge/``): ``bake.json`` (one schema for language
models and pipelines), the maps as baked, the recipe and its sentence files, and ``verify.json``.
Written here only; read through ``read_bake_info`` by verify, push, eval and the card."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import stat
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

from ..errors import VerificationError
from .files import file_kind
from .output import PROVENANCE_DIR

BAKE_JSON = "bake.json"
VERIFY_JSON = "verify.json"
MAPS_FILE = "maps.safetensors"


@dataclass
class BakeInfo:
    """What a bake was: enough to verify it, reproduce it and describe it. ``fold``: one row per
    map (``fold.SitePlan.to_dict``), data rather than display strings."""

    kind: Literal["llm", "pipeline"]
    base_model: str  # what the user gave (alias, Hub id, path)
    strength: float
    method: str
    actmerge_version: str
    revision: str | None = None
    base_path: str | None = None  # where the base was read from (a snapshot or local directory)
    # a base converted from a GGUF (built-in alias or .gguf file): alias, package and version, GGUF
    # file, its sha256 and quantisation, de-quantised dtype (``snapshots.gguf_origin``)
    origin: dict = field(default_factory=dict)
    recipe: str = ""  # the recipe's name ("a+b" when composed)
    recipe_hash: str = ""
    recipe_files: list[str] = field(default_factory=list)  # under actmerge/, as shipped
    strengths: list[float] = field(default_factory=list)  # per recipe, when composed
    config_patch: dict = field(default_factory=dict)
    targets: list[str] = field(default_factory=list)
    runtimes: list[str] = field(default_factory=list)
    pipeline_class: str | None = None
    edited_components: list[str] = field(default_factory=list)
    placement: dict = field(default_factory=dict)  # device / device map / memory used to fit
    tuned: dict = field(default_factory=dict)  # when `--strength auto` chose λ: the budget it met
    fold: list[dict] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> BakeInfo:
        known = {f.name for f in fields(cls)}
        data = dict(data)
        data.setdefault("kind", "pipeline" if data.get("kind") == "diffusers-pipeline" else "llm")
        if data["kind"] == "diffusers-pipeline":
            data["kind"] = "pipeline"
        data.setdefault("method", "")
        data.setdefault("actmerge_version", "")
        return cls(**{k: v for k, v in data.items() if k in known})


def read_bake_info(checkpoint: str | Path) -> BakeInfo | None:
    """The checkpoint's ``actmerge/bake.json``, or None when it has none."""
    path = Path(checkpoint) / PROVENANCE_DIR / BAKE_JSON
    if not path.is_file():
        return None
    try:
        return BakeInfo.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError) as exc:
        raise VerificationError(
            f"{path} is not a readable bake record ({exc}): re-bake the checkpoint."
        ) from None


def provenance_files(info: BakeInfo, maps_bytes: bytes, recipe_files: dict[str, bytes]) -> dict[str, bytes]:
    """``actmerge/…`` files of a bake: bake.json, the maps as baked, the recipe(s) and data files."""
    out = {
        f"{PROVENANCE_DIR}/{BAKE_JSON}": info.to_json().encode(),
        f"{PROVENANCE_DIR}/{MAPS_FILE}": maps_bytes,
    }
    for rel, data in recipe_files.items():
        out[f"{PROVENANCE_DIR}/{rel}"] = data
    return out


# Never published: hidden files and folders (.git, .cache, editor files), temp files of interrupted
# writes, bytecode. Matched like huggingface_hub matches (fnmatch on the relative posix path, `*`
# crosses `/`). Everything else in a checkpoint is recorded by verify and uploaded by push.
NEVER_PUBLISHED = (".*", "*/.*", "*.tmp", "__pycache__/*", "*/__pycache__/*")
# files that decide what the checkpoint computes: a change to one is "weights changed"
_WEIGHT_NAMES = ("config.json", "model_index.json")


def _never_published(rel: str) -> bool:
    return any(fnmatch.fnmatch(rel, pattern) for pattern in NEVER_PUBLISHED)


def checkpoint_files(checkpoint: str | Path) -> tuple[list[str], list[str]]:
    """(files, refused) of a checkpoint directory, walked without following links: ``files`` are the
    regular files that are published (relative posix paths, sorted; ``NEVER_PUBLISHED`` left out),
    ``refused`` says what may never be published: every symlink, anywhere in the directory (its
    target is outside what was written, or could be changed behind the record), and every entry that
    is not a regular file or a directory (a FIFO, a device, a socket)."""
    root = Path(checkpoint)
    files, refused = [], []
    for top, dirs, names in os.walk(root, followlinks=False):
        for name in sorted(dirs + names):
            path = Path(top) / name
            rel = path.relative_to(root).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                refused.append(f"{rel} is a symlink (to {os.readlink(path)})")
            elif stat.S_ISREG(mode):
                if not _never_published(rel):
                    files.append(rel)
            elif not stat.S_ISDIR(mode):
                refused.append(f"{rel} is {file_kind(mode)}, not a regular file")
    return sorted(files), refused


def _no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0))


def file_digest(path: Path) -> dict:
    """``{"sha256": …, "size": …}`` of one regular file, read without following a symlink."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb", opener=_no_follow) as f:
        while block := f.read(16 << 20):
            h.update(block)
            size += len(block)
    return {"sha256": h.hexdigest(), "size": size}


def files_digest(checkpoint: str | Path, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """sha256 and size of every published file of the checkpoint (``checkpoint_files``), but ``exclude``."""
    root = Path(checkpoint)
    files, _ = checkpoint_files(root)
    return {rel: file_digest(root / rel) for rel in files if rel not in exclude}


def verify_report_name(runtime: str = "transformers") -> str:
    return VERIFY_JSON if runtime == "transformers" else f"verify-{runtime}.json"


def write_verify_report(checkpoint: str | Path, report_json: str, runtime: str = "transformers") -> Path:
    """``actmerge/verify.json`` (``verify-llama.cpp.json``): the report plus ``files``, the sha256 and
    size of every file of the checkpoint as verified (weights, config, tokenizer, card, provenance;
    all but this report itself and what is never published), so that ``push`` publishes exactly that."""
    name = f"{PROVENANCE_DIR}/{verify_report_name(runtime)}"
    data = json.loads(report_json)
    data["files"] = files_digest(checkpoint, exclude=(name,))
    path = Path(checkpoint) / name
    path.parent.mkdir(exist_ok=True)
    path.unlink(missing_ok=True)  # a symlink put there is replaced, never written through
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def changed_since_verify(checkpoint: str | Path, report: dict) -> list[str] | None:
    """What differs from the files verify recorded ("model.safetensors changed", "evil.py added",
    "tokenizer.json removed"); None when the report records no file list (an older actmerge)."""
    recorded = report.get("files")
    if not isinstance(recorded, dict):
        return None
    current = files_digest(checkpoint, exclude=(f"{PROVENANCE_DIR}/{VERIFY_JSON}",))
    out = []
    for rel in sorted(set(recorded) | set(current)):
        if rel not in current:
            out.append(f"{rel} removed")
        elif rel not in recorded:
            out.append(f"{rel} added")
        elif recorded[rel] != current[rel]:
            out.append(f"{rel} changed")
    return out


def is_weights_file(rel: str) -> bool:
    """Whether a checkpoint file decides what it computes: safetensors shards and their index, config."""
    name = rel.rsplit("/", 1)[-1]
    return name.endswith((".safetensors", ".safetensors.index.json")) or name in _WEIGHT_NAMES
