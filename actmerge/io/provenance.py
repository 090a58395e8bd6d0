"""Provenance written beside baked weights (``actmerge/``): ``bake.json`` (one schema for language
models and pipelines), the maps as baked, the recipe and its sentence files, and ``verify.json``.
Written here only; read through ``read_bake_info`` by verify, push, eval and the card."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

from ..errors import VerificationError
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


def weights_digest(checkpoint: str | Path) -> dict[str, str]:
    """sha256 of every file that decides what the checkpoint computes: safetensors shards and their
    index, config.json (a pipeline: the same in every component folder, plus model_index.json)."""
    import hashlib

    root = Path(checkpoint)
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or rel.parts[0] == PROVENANCE_DIR or any(x.startswith(".") for x in rel.parts):
            continue
        if (
            p.suffix == ".safetensors"
            or p.name in ("config.json", "model_index.json")
            or p.name.endswith(".safetensors.index.json")
        ):
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while block := f.read(16 << 20):
                    h.update(block)
            out[rel.as_posix()] = h.hexdigest()
    return out


def write_verify_report(checkpoint: str | Path, report_json: str, runtime: str = "transformers") -> Path:
    """``actmerge/verify.json`` (``verify-llama.cpp.json``): the report plus the digest of the weights
    it verified, so that publishing can refuse weights changed since."""
    data = json.loads(report_json)
    data["weights_sha256"] = weights_digest(checkpoint)
    name = VERIFY_JSON if runtime == "transformers" else f"verify-{runtime}.json"
    path = Path(checkpoint) / PROVENANCE_DIR / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def changed_since_verify(checkpoint: str | Path, report: dict) -> list[str]:
    """Files whose digest differs from the one recorded by verify (all of them when none was)."""
    recorded = report.get("weights_sha256")
    current = weights_digest(checkpoint)
    if not isinstance(recorded, dict):
        return sorted(current)
    return sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
