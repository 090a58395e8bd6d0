"""The bake steps every kind of model shares (``kinds``: what differs is asked of the job's kind),
between the fold plan and the files: strengths, the maps a checkpoint really holds, provenance
(bake.json, maps, recipes with their sentence files, model card) and the write itself."""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import __version__, card, strength
from .errors import MapsMismatchError, RecipeError
from .evaluation.records import Report
from .evaluation.settings import chat_prompts, eval_config
from .evaluation.tables import markdown_table
from .fold import Exactness, FoldOptions, FoldPlan
from .io.files import read_regular
from .io.provenance import BakeInfo, provenance_files
from .kinds.base import ModelKind
from .kinds.llm.source import Loaded
from .kinds.llm.verify import VerifyReport
from .maps import MapSet, compose
from .options import BakeOptions
from .recipe import Recipe


def output_size(source) -> int:
    """Bytes a bake of ``source`` writes (its files; new biases are negligible)."""
    root = Path(source.path)
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def compose_all(
    mapsets: list[MapSet],
    strengths: list[float],
    *,
    allow_extrapolation: bool = False,
    warn: Callable[[str], None] = print,
) -> MapSet:
    """Apply each map set at its strength (each through the strength rules), in order; the result is
    meant for strength 1."""
    if len(mapsets) != len(strengths) or len(mapsets) < 2:
        raise RecipeError(
            f"compose needs ≥ 2 maps and one strength each (got {len(mapsets)}, {len(strengths)})."
        )
    strengths = strength.check(strengths, allow_extrapolation=allow_extrapolation, warn=warn, unique=False)
    out = compose(mapsets[0], mapsets[1], (strengths[0], strengths[1]))
    for ms, lam in zip(mapsets[2:], strengths[2:], strict=True):
        out = compose(out, ms, (1.0, lam))
    out.extra = {
        "recipe": "+".join(m.extra.get("recipe", "?") for m in mapsets),
        "strengths": ",".join(map(strength.text, strengths)),
    }
    return out


def held_maps(maps: MapSet, fold_plan: FoldPlan) -> MapSet:
    """The maps the checkpoint really holds: shifts that the plan dropped are zero."""
    dropped = {sp.key for sp in fold_plan.sites if sp.exactness is Exactness.SCALE_ONLY}
    out = {k: (m.scale_only() if k in dropped else m) for k, m in maps.items()}
    return MapSet(out, maps.base_model, maps.method, maps.recipe_hash, dict(maps.extra))


# names actmerge writes in ``actmerge/`` itself: a data file shipped verbatim must not take one
_RESERVED = {"recipe.yaml", "bake.json", "maps.safetensors", "verify.json", "verify-llama.cpp.json"}


def _prefix(i: int, count: int) -> str:
    """Where recipe ``i`` of ``count`` ships under ``actmerge/``."""
    return "" if count == 1 else f"recipe-{i + 1}/"


def recipe_bundle(recipes: list[Recipe], *, evaluated: bool = False, tuned: bool = False) -> dict[str, bytes]:
    """Each recipe as shipped inside the checkpoint's ``actmerge/`` folder with the data files this
    bake read (``Recipe.used_paths``: the fit's always; the eval files with ``evaluated``, the tuning
    split with ``tuned``; never a field it did not read), so that the card's Reproduce command works
    from the checkpoint alone. A recipe whose used files sit beside it (relative paths, no ``..``) is
    shipped verbatim, comments included, with the files at the same relative paths (fields it did not
    read keep naming files that are not shipped); otherwise it is rewritten with its used paths
    pointing at ``data/…`` copies and the other path fields left out. Several recipes: ``recipe-N/``.
    ``load_recipe`` has already refused any path leaving the recipe's directory."""
    files: dict[str, bytes] = {}
    for i, recipe in enumerate(recipes):
        prefix = _prefix(i, len(recipes))
        used = recipe.used_paths(evaluated=evaluated, tuned=tuned)
        verbatim = recipe.source_file is not None and all(
            not p.is_absolute()
            and ".." not in p.parts
            and p.parts[0] != "actmerge"
            and str(p) not in _RESERVED
            for p in used.values()
        )
        if verbatim:
            files[f"{prefix}recipe.yaml"] = recipe.source_file.read_bytes()
            for p in used.values():
                files[prefix + p.as_posix()] = read_regular(recipe.path(p))
            continue
        doc = recipe.model_dump(mode="json", exclude_defaults=True)
        for name in recipe.data_paths():
            doc.pop(name, None)
        for name, p in used.items():
            rel = f"data/{name}-{recipe.path(p).name}"
            files[prefix + rel] = read_regular(recipe.path(p))
            doc[name] = rel
        files[f"{prefix}recipe.yaml"] = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True).encode()
    return files


def reproduce_command(info: BakeInfo, *, has_maps_only: bool) -> str:
    """The shell command that rebuilds this bake from the published checkpoint (downloaded to
    ``model/``): the recipes as shipped there, quoted paths."""
    base = shlex.quote(card.model_argument(info.base_model))
    if has_maps_only:
        how = "--maps model/actmerge/maps.safetensors"
    else:
        how = " ".join(f"--recipe {shlex.quote('model/actmerge/' + f)}" for f in info.recipe_files)
    many = len(info.recipe_files) > 1
    lam = ",".join(map(strength.text, info.strengths)) if many else strength.text(info.strength)
    if info.tuned:  # chosen by `--strength auto` within a budget
        b = info.tuned["budget"]
        lam = "auto" + (f" --max-ppl-ratio {b['max_ppl_ratio']:g}" if b.get("max_ppl_ratio") else "")
        lam += f" --max-kl {b['max_kl']:g}" if b.get("max_kl") else ""
    return f"actmerge bake {base} {how} --strength {lam} -o out/"


def bake_info(job: BakeJob, fold_plan: FoldPlan, maps: MapSet) -> BakeInfo:
    """The provenance of ``job`` at one strength (``fold_plan``) holding ``maps``."""
    source, recipes = job.source, job.recipes
    strengths = [float(x) for x in maps.extra.get("strengths", "").split(",") if x]
    return BakeInfo(
        kind=job.kind.name,
        base_model=source.name,
        base_path=str(source.path),
        origin=getattr(source, "origin", None) or {},
        revision=source.revision,
        strength=fold_plan.strength,
        method=maps.method or "unknown",
        actmerge_version=__version__,
        recipe=maps.extra.get("recipe", "custom"),
        recipe_hash=maps.recipe_hash,
        recipe_files=[f"{_prefix(i, len(recipes))}recipe.yaml" for i in range(len(recipes))],
        strengths=strengths,
        config_patch=dict(fold_plan.config_patch),
        targets=sorted(fold_plan.targets),
        runtimes=sorted(fold_plan.runtimes),
        pipeline_class=getattr(source, "pipeline_class", None),
        edited_components=job.kind.edited_components(fold_plan),
        placement=job.loaded.placement.to_dict() if job.loaded is not None else {},
        tuned=job.tuned or {},
        fold=fold_plan.rows(),
    )


def write(
    job: BakeJob, info: BakeInfo, fold_plan: FoldPlan, maps: MapSet, out: Path, evaluation: str = ""
) -> list[str]:
    """Write the baked checkpoint or pipeline of ``job`` at one strength (``fold_plan``, holding
    ``maps``) to ``out`` with its provenance and card (``evaluation``: the table of ``--eval``);
    returns files left out (stale weight formats of edited pipeline components)."""
    recipes, source, kind = job.recipes, job.source, job.kind
    bundle = recipe_bundle(recipes, evaluated=bool(evaluation), tuned=bool(info.tuned))
    description = "\n\n".join(r.description.strip() for r in recipes if r.description)
    readme = card.render(
        info,
        kind.card_text(info, source),
        description=description,
        evaluation=evaluation,
        license=kind.license(source),
        reproduce=reproduce_command(info, has_maps_only=not recipes),
    )
    extra = {**provenance_files(info, maps.to_bytes(), bundle), "README.md": readme.encode()}
    return kind.write(source, fold_plan, out, extra, job)


@dataclass
class BakeResult:
    out: Path | None
    strength: float
    plan: FoldPlan
    seconds: float
    deviation: VerifyReport | None = None  # hooked full maps vs what was baked (shift dropped)
    evaluation: str = ""  # markdown table when evaluated after baking
    verification: object = None  # the verify report when verified after writing
    pushed: object = None  # hub.PushResult when published
    notes: list[str] = field(default_factory=list)
    gguf: object = None  # gguf_bake.GgufBake when written into a copy of a GGUF


@dataclass(frozen=True)
class BakeJob:
    """What every strength of one bake shares: the options as given (``out``/``dry_run`` as this step
    writes: a GGUF output is planned here and written by ``pipeline.bake``), and what the bake worked
    out from them — the model (``loaded`` for a language model), the maps, the checked strengths
    (``options.strengths`` is what was asked), the fold choices merged with the recipe's."""

    kind: ModelKind
    source: object  # ModelSource / LlamaLayout / PipelineSource
    loaded: Loaded | None
    maps: MapSet
    strengths: list[float]
    fold: FoldOptions
    recipes: list[Recipe]
    options: BakeOptions
    tuned: dict = field(default_factory=dict)  # how `--strength auto` chose λ (strength.from_record)
    progress: bool = True
    log: Callable[[str], None] = print


def bake_one(job: BakeJob, lam: float) -> BakeResult:
    """Plan, (evaluate,) and write the bake of ``job`` at strength ``lam``."""
    t0 = time.perf_counter()
    fold_plan = job.kind.plan(job.source, job.maps, lam, job.fold)
    if not fold_plan.active and lam != 0:
        raise MapsMismatchError(
            f"0 of {len(fold_plan.sites)} maps are active at λ = {lam:g}: the bake would be an unsteered copy. "
            "Check the recipe's sites/layers, or the maps file."
        )
    if job.options.as_llama:
        from .llama_layout import LLAMA_LAYOUT_PATCH

        fold_plan.config_patch = {**LLAMA_LAYOUT_PATCH, **fold_plan.config_patch}
    held = held_maps(job.maps, fold_plan)
    res = BakeResult(None, lam, fold_plan, 0.0)
    dropped = [sp for sp in fold_plan.sites if sp.exactness is Exactness.SCALE_ONLY]
    if dropped:
        note = f"shift dropped at {len(dropped)} sites (no bias to take it): scales baked only"
        res.deviation = job.kind.deviation(job.loaded, job.maps, held, lam)
        if res.deviation is not None:
            note += (
                f"; max |Δlogit| vs the full maps = {res.deviation.max_abs_logit_diff:.3g}, "
                f"top-1 agreement {res.deviation.argmax_agreement:.1%}"
            )
        res.notes.append(note)
    if not job.options.dry_run:
        dest = strength.out_for(job.options.out, lam, job.strengths)
        if job.options.evaluate_after:
            report = _evaluate_plan(job.loaded, held, lam, job.recipes[0], job.progress, job.log)
            res.evaluation = markdown_table(report)
        skipped = write(
            job, bake_info(job, fold_plan, held), fold_plan, held, dest, evaluation=res.evaluation
        )
        if skipped:
            res.notes.append(f"left out stale weight files of edited components: {', '.join(skipped)}")
        res.out = dest
    res.seconds = time.perf_counter() - t0
    return res


def _evaluate_plan(loaded: Loaded, held: MapSet, lam: float, recipe: Recipe, progress, log) -> Report:
    """Base vs the maps at ``lam`` hooked (what the checkpoint computes), on the recipe's eval prompts,
    evaluated before the write so the table goes into the card inside the atomic output."""
    from .evaluation.sweep import SweepRows, run_sweep

    m, tok = loaded.get()
    cfg = chat_prompts(eval_config(recipe), tok, log)
    rows = SweepRows(maps=held, strengths=[lam], include_base=True)
    return run_sweep(m, tok, cfg, rows, model_name=loaded.source.name, progress=progress, log=log)
