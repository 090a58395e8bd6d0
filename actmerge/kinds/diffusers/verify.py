"""Verification for pipelines: the base pipeline with the maps applied by hooks vs the baked pipeline
reloaded by plain diffusers in a fresh process that never imports actmerge.

Both run the same prompts with the same seed (so the same initial latents) and steps, with the
pipeline's own classifier-free guidance; compared are every text-encoder output tensor, the
denoiser output at every step, and the final latents. Error = max |Δ| / max |reference| per
tensor. A text-encoder shift that was folded into the denoiser (T5 → caption_projection) is not in
the baked text encoder's output: the text-encoder comparison leaves those shifts out of the hooked
reference, the denoiser comparison includes them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...errors import VerificationError
from ...io.output import PROVENANCE_DIR
from ...io.provenance import read_bake_info, write_verify_report
from ...maps import MapSet
from ...tolerance import PIPELINE_RELATIVE, for_dtypes
from ..shared import run_isolated
from .collect import denoiser_name, load_pipeline
from .hooks import steer
from .plan import shift_home
from .probe import SCRIPT as PROBE_SCRIPT
from .probe import probe
from .sites import site_for_key
from .source import PipelineSource, resolve_pipeline
from .table import component_for

PROMPTS = [
    "a lighthouse on a cliff at sunset",
    "a bowl of ripe cherries on a wooden table",
    "a pink elephant walking through a busy market",
]
STEPS = 2
SEED = 0


@dataclass(frozen=True)
class Group:
    max_abs: float
    max_ref: float
    max_rel: float  # max over tensors of max|Δ| / max|reference|
    n_tensors: int


@dataclass
class PipelineVerifyReport:
    groups: dict[str, Group]
    tolerance: float
    passed: bool
    n_prompts: int
    steps: int
    moved_shifts: list[str] = field(default_factory=list)

    @property
    def max_rel(self) -> float:
        return max((g.max_rel for g in self.groups.values()), default=0.0)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def text_components(source: PipelineSource) -> list[str]:
    return [n for n, c in source.components.items() if (r := component_for(c)) and r.role == "text_encoder"]


def compare(ref: dict, got: dict, tolerance: float, **kw) -> PipelineVerifyReport:
    groups = {}
    for name, a_list in ref.items():
        b_list = got.get(name, [])
        if len(a_list) != len(b_list):
            raise VerificationError(
                f"{name}: {len(a_list)} reference tensors but {len(b_list)} from the baked pipeline."
            )
        abs_, refm, rel = 0.0, 0.0, 0.0
        for a, b in zip(a_list, b_list, strict=True):
            if a.shape != b.shape:
                raise VerificationError(f"{name}: shapes {tuple(a.shape)} vs {tuple(b.shape)}.")
            d, m = float((a - b).abs().max()), float(a.abs().max())
            abs_, refm, rel = max(abs_, d), max(refm, m), max(rel, d / max(m, 1e-30))
        groups[name] = Group(abs_, refm, rel, len(a_list))
    passed = all(g.max_rel <= tolerance for g in groups.values())
    return PipelineVerifyReport(groups, tolerance, passed, **kw)


def run_fresh(checkpoint: Path, args: dict) -> dict:
    """``probe.py`` on the baked pipeline in a fresh interpreter (plain diffusers)."""
    return run_isolated(
        ["-P", PROBE_SCRIPT, str(checkpoint.resolve())],
        args,
        f"plain diffusers could not load/run {checkpoint}",
    )


def hooked(pipe, source: PipelineSource, maps: MapSet, strength: float, args: dict) -> dict:
    """The probe on the base pipeline with the maps hooked; text outputs without moved shifts."""
    moved = moved_shifts(source, maps)
    with steer(pipe.components, maps, strength):
        full = probe(pipe, **args)
    if moved:
        inside = MapSet({k: (m.scale_only() if k in moved else m) for k, m in maps.items()})
        with steer(pipe.components, inside, strength):
            text = probe(pipe, **args)
        full.update({k: v for k, v in text.items() if k.startswith("text:")})
    return full


def moved_shifts(source: PipelineSource, maps: MapSet) -> list[str]:
    """Keys whose shift the plan folds into another component (a text encoder's output → the DiT)."""
    out = []
    for key in maps.maps:
        site = site_for_key(source, key)
        if site.rule.fold == "rmsnorm" and site.rule.text_output:
            homes, _ = shift_home(source, site)
            if any(c != site.component for c, _ in homes):
                out.append(key)
    return out


def verify_pipeline(
    checkpoint: str | Path,
    *,
    base: str | PipelineSource | None = None,
    maps: str | Path | MapSet | None = None,
    strength: float | None = None,
    tolerance: float | None = None,
    prompts: list[str] | None = None,
    steps: int = STEPS,
    device: str | None = None,
    pipe=None,
    fresh: bool = True,
) -> PipelineVerifyReport:
    """Hooked base vs baked pipeline; missing arguments come from the checkpoint's actmerge/ files.
    ``fresh=False`` reloads the baked pipeline with plain diffusers in this process instead of a
    fresh interpreter (faster; the hooks never touch that pipeline either way)."""
    checkpoint = Path(checkpoint)
    info = read_bake_info(checkpoint)
    if base is None:
        local = info.base_path if info else None
        base = local if local and Path(local).is_dir() else (info.base_model if info else _need("--base"))
    if maps is None:
        maps = checkpoint / PROVENANCE_DIR / "maps.safetensors"
        if not maps.is_file():
            _need("--maps")
    if strength is None:
        strength = info.strength if info else _need("--strength")
    source = base if isinstance(base, PipelineSource) else resolve_pipeline(base)
    mapset = maps if isinstance(maps, MapSet) else MapSet.load(maps)
    baked = resolve_pipeline(checkpoint)
    edited = info.edited_components if info else list(baked.components)
    if tolerance is None:
        dtypes = {i.dtype for c in edited for i in baked.tensors(c).values()}
        tolerance = for_dtypes(PIPELINE_RELATIVE, dtypes)
    args = {
        "prompts": prompts or PROMPTS,
        "texts": text_components(source),
        "denoiser": denoiser_name(source),
        "steps": steps,
        "seed": SEED,
    }
    pipe = pipe if pipe is not None else load_pipeline(source, device)
    ref = hooked(pipe, source, mapset, strength, args)
    device = str(pipe.device)  # the baked pipeline runs where the hooked reference ran
    got = (
        run_fresh(checkpoint, {**args, "device": device})
        if fresh
        else probe(load_pipeline(baked, device), **args)
    )
    report = compare(
        ref,
        got,
        tolerance,
        n_prompts=len(args["prompts"]),
        steps=steps,
        moved_shifts=moved_shifts(source, mapset),
    )
    write_verify_report(checkpoint, report.to_json())
    return report


def _need(flag: str):
    raise VerificationError(f"the pipeline has no actmerge/bake.json to read this from: pass {flag}.")
