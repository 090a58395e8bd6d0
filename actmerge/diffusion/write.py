"""Write a baked pipeline directory (DESIGN.md §6 for pipelines).

Components keep their folders. A component the plan does not touch is copied verbatim (every
file byte-identical). In an edited component every safetensors weight set (the default one and
variants such as ``.fp16``) is copied at the byte level with the planned tensors overwritten in
place (same names, shapes, dtypes, shard layout and index); other weight formats there (.bin,
.ckpt, .onnx …) would go stale and are left out. Everything else is copied verbatim; the top-level
README.md becomes the model card. Written to a temp dir beside the output, then renamed.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..checkpoint import (
    PROVENANCE_DIR,
    STALE_WEIGHTS,
    _Reader,
    _write_shard,
    check_output,
    read_shard,
    tensor_index,
)
from ..errors import MapsMismatchError
from .plan import PipelinePlan
from .source import PipelineSource, WeightSet


def write_pipeline(
    source: PipelineSource,
    plan: PipelinePlan,
    out: Path,
    *,
    extra: dict[str, bytes] | None = None,
    force: bool = False,
) -> tuple[Path, list[str]]:
    """Write the baked pipeline to ``out``; returns it and the files left out (stale formats)."""
    check_output(out, source.path, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    skipped: list[str] = []
    try:
        edited = {c for c, mods in plan.edits.items() if mods}
        rewritten: set[Path] = set()
        for component in sorted(edited):
            for ws in source.weight_sets(component):
                _write_set(plan, component, ws, tmp / component)
                rewritten |= set(ws.files)
        for p in sorted(source.path.rglob("*")):
            rel = p.relative_to(source.path)
            if p.is_dir() or any(part.startswith(".") for part in rel.parts) or p in rewritten:
                continue
            if rel.parts[0] == PROVENANCE_DIR or rel.as_posix() == "README.md":
                continue
            if rel.parts[0] in edited and p.suffix in STALE_WEIGHTS:
                skipped.append(rel.as_posix())
                continue
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dest)
        for rel, data in (extra or {}).items():
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out, skipped


def _write_set(plan: PipelinePlan, component: str, ws: WeightSet, dest_dir: Path) -> None:
    """Each shard of one weight set, with the edited tensors that live in it overwritten."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    _, where = tensor_index(ws.files)
    edited = plan.edited_tensors(component)
    missing = [t for t in edited if t not in where]
    if missing:
        raise MapsMismatchError(
            f"{ws.files[0].relative_to(ws.files[0].parents[1])}: tensors {missing[:3]} are missing from this "
            "weight set (a variant with other tensor names?); remove the variant or bake it separately."
        )
    for path in ws.files:
        shard = read_shard(path)
        modules = sorted({m for t, m in edited.items() if where[t].path == path})
        values = {}
        with _Reader(where) as read:
            for module in modules:  # a module's weight and bias may sit in different shards
                values.update(
                    {k: v for k, v in plan.compute(component, module, read).items() if where[k].path == path}
                )
        _write_shard(shard, values, dest_dir / path.name)
