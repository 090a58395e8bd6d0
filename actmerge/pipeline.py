"""The verbs — fit, bake, verify, evaluate, sites — as a library API a notebook can call. Each verb
owns its whole flow (a bake fits, plans, writes, verifies and publishes itself, reusing the loaded
model and its placement); the CLI only parses, calls one verb and renders the result. Language models
and diffusers pipelines go through the same verbs: ``model_kind`` decides which one a model is."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from . import baking, distributed
from .baking import BakeResult, compose_all, plan  # noqa: F401  (library API)
from .baking import held_maps as baked_maps  # noqa: F401
from .errors import ActmergeError, MapsMismatchError, ModelResolutionError, RecipeError
from .evalconfig import NEUTRAL_TEXT, chat_prompts, eval_config  # noqa: F401  (library API)
from .fitting import (  # noqa: F401
    FitResult,
    Loaded,
    _load_recipe,
    _pipeline_source,
    fit,
    frozen_shifts,
    load,
    model_kind,
    preflight_checkpoint,
    preflight_recipe,
    recipe_sites,
)
from .fold import FoldOptions
from .io.output import check_free_space, check_output
from .io.provenance import MAPS_FILE, read_bake_info
from .maps import MapSet
from .models import resolve
from .placement import Placement
from .recipe import Recipe, load_recipe
from .sites import architecture_for
from .sweep import EvalConfig, Report  # noqa: F401


def bake(
    model,
    *,
    recipe: str | Path | Recipe | list | None = None,
    maps: str | Path | MapSet | None = None,
    strengths: list[float] | None = None,
    out: str | Path | None = None,
    options: FoldOptions | None = None,
    targets=(),
    shift_policy: str | None = None,
    allow_flags: bool = True,
    force: bool = False,
    dry_run: bool = False,
    revision: str | None = None,
    placement: Placement | None = None,
    progress: bool = True,
    log=print,
    evaluate_after: bool = False,
    as_llama: bool = False,
    verify: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    allow_extrapolation: bool = False,
    tune_budget=None,
    pipe=None,
) -> list[BakeResult]:
    """Fit (from recipes) or load maps, plan the fold at each strength, write the checkpoints, and
    optionally verify and publish each (publishing implies verifying).

    Several recipes compose: each is fitted and applied at its own strength (``strengths`` gives one
    per recipe), maps at shared sites compose in recipe order, and one checkpoint is baked.
    ``as_llama``: write a Mistral checkpoint in the Llama layout (``llama_layout``). ``tune_budget``
    (a ``tune.Budget``): ``--strength auto``, the strength ``actmerge tune`` recorded for this model,
    recipe and budget (tuned now on the fitted maps if none is recorded)."""
    recipes = [] if recipe is None else (list(recipe) if isinstance(recipe, list | tuple) else [recipe])
    if bool(recipes) == (maps is not None):
        raise RecipeError("give exactly one of a recipe (to fit) or a maps file (already fitted).")
    kind = model_kind(model, revision)
    recipe_objs = [_load_recipe(r, kind, log) for r in recipes]
    options = options or FoldOptions.merged(
        recipe_objs[0] if recipe_objs else None,
        targets=targets,
        shift_policy=shift_policy,
        allow_config_change=allow_flags,
    )
    if kind == "pipeline":
        given = {"--target": bool(options.targets), "--as-llama": as_llama, "--eval": evaluate_after}
        given |= {"--push-to-hub": bool(push_to_hub), "--no-flags": not allow_flags}
        given |= {"composed recipes": len(recipe_objs) > 1}
        if any(given.values()):
            raise RecipeError(
                f"{', '.join(k for k, v in given.items() if v)}: not available for diffusers pipelines."
            )
        source = _pipeline_source(model, revision)
        loaded = None
    else:
        loaded = load(model, revision=revision, placement=placement, log=log)
        if as_llama:
            from .llama_layout import LlamaLayout, as_llama_config

            src = loaded.source
            as_llama_config(src.config)  # refuse (not Mistral, a binding sliding window) before the fit
            loaded = replace(loaded, source=LlamaLayout(src.name, src.path, src.revision))
        source = loaded.source
    per_recipe: list[float] = []
    if len(recipe_objs) > 1:
        per_recipe = baking.check_strengths(
            strengths or [_default_strength(r, source) for r in recipe_objs],
            allow_extrapolation=allow_extrapolation,
            warn=log,
        )
        if len(per_recipe) != len(recipe_objs):
            raise RecipeError(
                f"{len(recipe_objs)} recipes need {len(recipe_objs)} strengths, got {per_recipe}."
            )
        strengths = [1.0]  # the composed maps already hold each recipe's strength
    strengths = baking.check_strengths(
        strengths or [_default_strength(recipe_objs[0], source) if recipe_objs else 1.0],
        allow_extrapolation=allow_extrapolation,
        warn=log,
    )
    if evaluate_after and (not recipe_objs or recipe_objs[0].eval_prompts is None):
        raise RecipeError("--eval needs a recipe with `eval_prompts:` (use `actmerge eval` for maps files).")
    if push_to_hub:
        from . import hub

        hub.validate_repo_id(push_to_hub)
        hub.require_token()  # before the (slow) fit, not after it
        verify = True  # a push publishes verified checkpoints only
    for r in recipe_objs:  # before any model load: sentence files readable and large enough
        preflight_recipe(r, log)
    if kind == "llm":
        preflight_checkpoint(source)
    if not dry_run:
        if out is None:
            raise RecipeError("give an output directory with -o/--out (or --dry-run to only print the plan).")
        for lam in strengths:  # fail before the (slow) fit if an output cannot be written
            check_output(baking.out_for(Path(out), lam, strengths), source.path, force=force)
        check_free_space(Path(out), baking.output_size(source) * len(strengths))
    fit_kw = dict(
        revision=revision, placement=placement, options=options, progress=progress, log=log, pipe=pipe
    )
    target = source if kind == "pipeline" else loaded
    if len(recipe_objs) > 1:
        fitted = [fit(target, r, **fit_kw).maps for r in recipe_objs]
        mapset = baking.compose_all(fitted, per_recipe)
    elif recipe_objs:
        mapset = fit(target, recipe_objs[0], **fit_kw).maps
    else:
        mapset = maps if isinstance(maps, MapSet) else MapSet.load(maps)
        if not mapset.maps:
            raise MapsMismatchError("the maps file holds no maps.")
    if not distributed.proceed_on_main():  # under a launcher: the others helped fit; rank 0 goes on
        return []
    tuned = {}
    if tune_budget is not None:
        tuned = _auto_strength(loaded, recipe_objs, mapset, tune_budget, progress, log)
        strengths = [tuned["strength"]]
    job = baking.BakeJob(
        kind,
        source,
        loaded,
        mapset,
        strengths,
        Path(out) if out is not None else None,
        options,
        recipe_objs,
        dry_run,
        force,
        progress,
        log,
        evaluate_after,
        as_llama,
        tuned,
    )
    results: list[BakeResult] = []
    try:
        for lam in strengths:
            results.append(baking.bake_one(job, lam))
    except BaseException as exc:  # say exactly which strengths were written before the failure
        exc.actmerge_written = [str(r.out) for r in results if r.out is not None]
        raise
    for res in results:
        if res.out is not None and verify:
            res.verification = globals()["verify"](
                res.out, base=loaded if kind == "llm" else source, log=log, pipe=pipe, progress=progress
            )
            if not res.verification.passed:
                return results
    if push_to_hub:
        from . import hub

        for res in results:
            repo = push_to_hub if len(results) == 1 else hub.strength_repo_id(push_to_hub, res.strength)
            res.pushed = hub.push(res.out, repo, private=private, verify_required=True, log=log)
    return results


def _auto_strength(loaded, recipes: list, mapset, budget, progress, log) -> dict:
    """``--strength auto``: the recorded tuning for (model, recipe, budget), else tune the fitted maps."""
    from .tune import provenance, recall, tune

    if len(recipes) > 1 or loaded is None:
        raise RecipeError(
            "--strength auto tunes one recipe: bake a single --recipe (or the --maps file of one)."
        )
    if recipes:
        recipe = recipes[0]
        key, name = recipe.content_hash(), recipe.name
    else:  # --maps: the strength `actmerge tune --maps` recorded for the recipe the maps came from
        key, name = mapset.recipe_hash, mapset.extra.get("recipe", "these maps")
    rec = recall(loaded.source.name, key, budget)
    if rec is None and not recipes:
        raise RecipeError(
            f"--strength auto with --maps: no strength recorded for {name} on {loaded.source.name} within "
            f"{budget.describe()}. Run `actmerge tune MODEL --recipe R --maps M` with the same budget first "
            "(it records one), or bake with --recipe R."
        )
    if rec is None:
        log(f"no recorded tuning for {name} on {loaded.source.name} within {budget.describe()}: tuning now")
        rec = tune(loaded, recipe, maps=mapset, budget=budget, progress=progress, log=log).to_dict()
    else:
        log(
            f"--strength auto: λ = {rec['strength']:g} (recorded by actmerge tune within {budget.describe()})"
        )
    if not rec["met"]:
        raise RecipeError(f"--strength auto: {rec['note']}")
    return provenance(rec)


def _default_strength(recipe: Recipe, source) -> float:
    """The recipe's strength, for this model's family when the recipe gives one per family."""
    if not isinstance(recipe.strength, dict):
        return recipe.strength
    return recipe.strength_for(architecture_for(source.config))


def verify(
    checkpoint: str | Path,
    *,
    base=None,
    maps: str | Path | MapSet | None = None,
    strength: float | None = None,
    tolerance: float | None = None,
    prompts: list[str] | None = None,
    placement: Placement | None = None,
    log=print,
    runtime: str = "transformers",
    outtype: str = "f32",
    progress: bool = True,
    pipe=None,
    fresh: bool = True,
):
    """The hooked base vs the baked checkpoint reloaded in a fresh process that never imports actmerge
    (a pipeline: plain diffusers). Missing arguments come from the checkpoint's ``actmerge/`` files;
    the base is loaded with the bake's recorded revision (or reused when ``base`` is a loaded model).
    ``runtime="llama.cpp"``: GGUF round trips of the baked checkpoint and of the unbaked base."""
    from .verify import verify_checkpoint

    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise ModelResolutionError(
            f"{checkpoint} does not exist or is not a directory: give a baked output directory."
        )
    info = read_bake_info(checkpoint)
    if maps is None:
        maps = checkpoint / "actmerge" / MAPS_FILE
        if not maps.is_file():
            raise ActmergeError(
                f"{checkpoint} has no actmerge/{MAPS_FILE}: pass --maps (and --base, --strength)."
            )
    if strength is None:
        strength = info.strength if info else _need("--strength")
    mapset = maps if isinstance(maps, MapSet) else MapSet.load(maps)
    kind = info.kind if info else ("pipeline" if (checkpoint / "model_index.json").is_file() else "llm")
    if kind == "pipeline":
        from .diffusion.verify import verify_pipeline

        if base is None:
            local = info.base_path if info else None
            base = local if local and Path(local).is_dir() else (info.base_model if info else _need("--base"))
        return verify_pipeline(
            checkpoint,
            base=_pipeline_source(base, info.revision if info else None),
            maps=mapset,
            strength=strength,
            tolerance=tolerance,
            prompts=prompts,
            device=(placement or Placement()).device,
            pipe=pipe,
            fresh=fresh,
        )
    if base is None:
        base = info.base_model if info else _need("--base")
    loaded = load(base, revision=info.revision if info else None, placement=placement, log=log)
    return verify_checkpoint(
        checkpoint,
        loaded,
        mapset,
        strength,
        tolerance=tolerance,
        prompts=prompts,
        runtime=runtime,
        outtype=outtype,
        progress=progress,
        log=log,
    )


def _need(flag: str):
    raise ActmergeError(f"the checkpoint has no actmerge/bake.json to read this from: pass {flag}.")


def evaluate(
    model,
    *,
    recipe: str | Path | None = None,
    maps: str | Path | MapSet | None = None,
    strengths: list[float] = (),
    baked: list[Path] = (),
    out: str | Path | None = None,
    config: EvalConfig | None = None,
    include_base: bool = False,
    clamped: bool = True,
    revision: str | None = None,
    placement: Placement | None = None,
    progress: bool = True,
    log=print,
    lm_eval: list[str] = (),
    lm_eval_include: str | Path | None = None,
    lm_eval_limit: int | None = None,
    **overrides,
) -> Report:
    """Sweep hooked strengths and baked checkpoints on identical prompts; write report.json and sweep.png.

    ``lm_eval``: lm-evaluation-harness tasks run on the base model and on each baked directory
    (``lmeval.scores``); the scores join those rows' metrics and each baked checkpoint's card."""
    from .sweep import plot, run_sweep

    _check_baked_dirs(baked)  # before any slow load
    loaded = load(model, revision=revision, placement=placement, log=log)
    recipe_obj = (
        load_recipe(recipe, log=log) if recipe is not None and not isinstance(recipe, Recipe) else recipe
    )
    cfg = config or eval_config(recipe_obj, **overrides)
    mapset, support = None, None
    if maps is not None:
        mapset = maps if isinstance(maps, MapSet) else MapSet.load(maps)
    elif recipe_obj is not None and strengths:
        fitted = fit(loaded, recipe_obj, progress=progress, log=log)
        mapset = fitted.maps
        # ml-act's clamped variant needs the source support, which only a fresh Linear-AcT fit knows
        if clamped and recipe_obj.method == "linear_act":
            support = getattr(fitted.report, "support", None)
    m, tok = loaded.get()
    cfg = chat_prompts(cfg, tok, log)
    report = run_sweep(
        m,
        tok,
        cfg,
        maps=mapset,
        strengths=list(strengths),
        baked=[Path(b) for b in baked],
        include_base=include_base,
        model_name=loaded.source.name,
        progress=progress,
        log=log,
        support=support,
    )
    if lm_eval:
        from .lmeval import add_rows

        add_rows(
            report, loaded.source.path, m, list(lm_eval), list(baked), lm_eval_include, lm_eval_limit, log
        )
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        report.save(out / "report.json")
        plot(report, out / "sweep.png")
    return report


def _check_baked_dirs(baked) -> None:
    for b in baked:
        b = Path(b)
        if not (b / "config.json").is_file():
            what = "does not exist" if not b.exists() else "has no config.json (not a checkpoint directory)"
            raise ModelResolutionError(
                f"--baked {b}: {what}. Give the output directory of `actmerge bake` (it holds config.json "
                "and the safetensors), e.g. --baked out/gemma-3-270m-detox."
            )


def sites(
    model: str | None = None, *, targets=(), revision: str | None = None, log=print
) -> tuple[str, list[dict]]:
    """(title, rows): where a scale and a shift fold for this model's config, or for a pipeline's
    components. Without a model: the site vocabulary of every architecture row."""
    from .fold import capabilities
    from .sites import ARCHITECTURES

    if model is None:
        rows = [
            {
                "arch": f"{a.name} ({', '.join(a.model_types)}): {a.notes}",
                "site": n,
                "module": f"{a.layers}.{r.module}",
                "side": r.side,
                "fold": r.fold,
                "about": r.about,
            }
            for a in ARCHITECTURES
            for n, r in a.sites.items()
        ]
        return "site vocabulary", rows
    if model_kind(model, revision) == "pipeline":
        from .diffusion.plan import capabilities as pipeline_capabilities

        source = _pipeline_source(model, revision)
        return f"{model}: {source.pipeline_class}", pipeline_capabilities(source)
    config = resolve(model, revision, log=log).config
    arch = architecture_for(config)
    return f"{model}: {arch.name}", capabilities(arch, config, frozenset(targets))
