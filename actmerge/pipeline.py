"""The verbs — fit, bake, verify, evaluate, sites — as a library API a notebook can call; each owns its
whole flow (a bake fits, plans, writes, verifies and publishes itself), for language models and
diffusers pipelines alike (``kinds.kind_of`` decides which, once per verb; what differs is asked of the
kind). The CLI parses, calls one verb, renders."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from . import baking, distributed, gguf_bake
from . import strength as strength_rules
from .baking import BakeResult, compose_all  # noqa: F401  (library API)
from .baking import held_maps as baked_maps  # noqa: F401
from .errors import ActmergeError, MapsMismatchError, ModelResolutionError, RecipeError
from .evaluation.records import EvalConfig, Report  # noqa: F401
from .evaluation.settings import NEUTRAL_TEXT, chat_prompts, check_eval_paths, eval_config  # noqa: F401  (library API)
from .fitting import FitResult, Loaded, fit, load, preflight_maps, preflight_recipe, resolved, source_path  # noqa: F401
from .fold import FoldOptions, FoldPlan
from .io.output import check_free_space, check_output
from .io.provenance import MAPS_FILE, read_bake_info
from .kinds.base import VerifyRequest
from .kinds.registry import kind_of
from .maps import MapSet
from .options import BakeOptions, EvalOptions, EvalOverrides, TuneOptions, VerifyOptions  # noqa: F401  (library API)
from .recipe import Recipe, load_recipe


def bake(
    model,
    *,
    recipe: str | Path | Recipe | list | None = None,
    maps: str | Path | MapSet | None = None,
    options: BakeOptions = BakeOptions(),
    progress: bool = True,
    log=print,
    pipe=None,
) -> list[BakeResult]:
    """Fit (from recipes) or load maps, plan the fold at each strength, write the checkpoints, and
    optionally verify and publish each (publishing implies verifying): how, in ``options``.

    Several recipes compose: each is fitted and applied at its own strength (``options.strengths``
    gives one per recipe), maps at shared sites compose in recipe order, and one checkpoint is baked.
    ``options.as_llama``: write a Mistral checkpoint in the Llama layout (``llama_layout``).
    ``options.tune_budget`` (an ``evaluation.budget.Budget``): ``--strength auto``, the strength ``actmerge tune``
    recorded for this model, recipe and budget (tuned now on the fitted maps if none is recorded)."""
    o = options
    recipes = [] if recipe is None else (list(recipe) if isinstance(recipe, list | tuple) else [recipe])
    if bool(recipes) == (maps is not None):
        raise RecipeError("give exactly one of a recipe (to fit) or a maps file (already fitted).")
    kind = kind_of(model, o.revision)
    recipe_objs = [kind.load_recipe(r, log) for r in recipes]
    fold_options = o.fold_options(recipe_objs[0] if recipe_objs else None)
    target = kind.bake_target(model, o, fold_options, len(recipe_objs), log)  # refusals before any load
    source, loaded = kind.source_of(target), kind.language_model(target)
    given_maps = None
    if maps is not None:
        given_maps = maps if isinstance(maps, MapSet) else MapSet.load(maps)
        if not given_maps.maps:
            raise MapsMismatchError("the maps file holds no maps.")
        kind.preflight_maps(given_maps, source, log)
    check = dict(allow_extrapolation=o.allow_extrapolation, warn=log)
    strengths = list(o.strengths) if o.strengths is not None else None
    per_recipe: list[float] = []
    if len(recipe_objs) > 1:  # one strength per recipe, repeats included
        typed = strengths or [strength_rules.default_for(r, source) for r in recipe_objs]
        per_recipe = strength_rules.check(typed, unique=False, **check)
        if len(per_recipe) != len(recipe_objs):
            raise RecipeError(
                f"{len(recipe_objs)} recipes need {len(recipe_objs)} strengths, got {per_recipe}."
            )
        strengths = [1.0]  # the composed maps already hold each recipe's strength
    tuned = {}
    if o.tune_budget is not None:  # the recorded λ, through the same rules, before any load
        tuned = _recorded_strength(loaded, recipe_objs, given_maps, o.tune_budget, o.allow_extrapolation, log)
        strengths = [tuned["strength"]] if tuned else None
    default = [strength_rules.default_for(recipe_objs[0], source) if recipe_objs else 1.0]
    strengths = strength_rules.check(strengths or default, **check)
    out, dry_run, verify_after = o.out, o.dry_run, o.verify_after
    gguf_src = gguf_out = None
    if not dry_run and kind.writes_gguf(out):  # GGUF in, GGUF out (gguf_bake.py)
        if o.as_llama or o.push_to_hub:
            raise RecipeError("-o X.gguf: --as-llama and --push-to-hub are for checkpoint directories.")
        gguf_src = gguf_bake.preflight(source.name, out, strengths, o.force)
        gguf_out, out, dry_run = out, None, True  # plan only; the GGUF is written below
    if o.evaluate_after and (not recipe_objs or recipe_objs[0].eval_prompts is None):
        raise RecipeError("--eval needs a recipe with `eval_prompts:` (use `actmerge eval` for maps files).")
    if o.evaluate_after:
        eval_config(recipe_objs[0])  # its eval files exist and decode: before the (slow) fit, not after
    if o.push_to_hub:
        from . import hub

        hub.validate_repo_id(o.push_to_hub)
        hub.require_token()  # before the (slow) fit, not after it
        verify_after = True  # a push publishes verified checkpoints only
    for r in recipe_objs:  # before any model load: sentence files readable and large enough
        preflight_recipe(r, log)
    kind.preflight_checkpoint(source)
    if not dry_run:
        if out is None:
            raise RecipeError("give an output directory with -o/--out (or --dry-run to only print the plan).")
        for lam in strengths:  # fail before the (slow) fit if an output cannot be written
            check_output(strength_rules.out_for(out, lam, strengths), source.path, force=o.force)
        check_free_space(out, baking.output_size(source) * len(strengths))
    fit_kw = dict(
        revision=o.revision,
        placement=o.placement,
        options=fold_options,
        progress=progress,
        log=log,
        pipe=pipe,
    )
    if len(recipe_objs) > 1:
        fitted = [fit(target, r, **fit_kw).maps for r in recipe_objs]
        mapset = baking.compose_all(fitted, per_recipe, warn=lambda _: None)  # checked and warned above
    elif recipe_objs:
        mapset = fit(target, recipe_objs[0], **fit_kw).maps
    else:
        mapset = given_maps
    if not distributed.proceed_on_main():  # under a launcher: the others helped fit; rank 0 goes on
        return []
    if o.tune_budget is not None and not tuned:  # nothing recorded: tune the fitted maps now
        from .evaluation.tune import tune

        rec = tune(
            loaded,
            recipe_objs[0],
            maps=mapset,
            options=TuneOptions(budget=o.tune_budget),
            progress=progress,
            log=log,
        )
        tuned = strength_rules.from_record(
            rec.to_dict(), where="this tuning run", allow_extrapolation=o.allow_extrapolation
        )
        strengths = [tuned["strength"]]
    job = baking.BakeJob(
        kind=kind,
        source=source,
        loaded=loaded,
        maps=mapset,
        strengths=strengths,
        fold=fold_options,
        recipes=recipe_objs,
        tuned=tuned,
        options=replace(o, out=out, dry_run=dry_run),  # a GGUF output: plan only here, written below
        progress=progress,
        log=log,
    )
    results: list[BakeResult] = []
    parent = out if out is not None and len(strengths) > 1 and not out.exists() else None
    try:
        for lam in strengths:
            results.append(baking.bake_one(job, lam))
    except BaseException as exc:  # say exactly which strengths were written before the failure
        exc.actmerge_written = [str(r.out) for r in results if r.out is not None]
        if parent is not None and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()  # the lambda-* folder made for this bake, left empty by its first strength
        raise
    if gguf_out is not None:
        res = results[0]
        written = gguf_bake.write_gguf(
            gguf_src,
            res.plan,
            gguf_bake.snapshot_reader(source),
            source.config,
            gguf_out,
            force=o.force,
            keep_exact=verify_after,
            log=log,
        )
        res.notes += written.notes()
        res.gguf = written
        if verify_after:
            held = baking.held_maps(mapset, res.plan)
            res.verification = gguf_bake.verify_gguf(
                gguf_out, gguf_src, loaded, held, res.strength, bake=written
            )
        res.out = gguf_out
        return results
    for res in results:
        if res.out is not None and verify_after:
            res.verification = verify(res.out, base=target, log=log, pipe=pipe, progress=progress)
            if not res.verification.passed:
                return results
    if o.push_to_hub:
        from . import hub

        for res in results:
            repo = o.push_to_hub if len(results) == 1 else hub.strength_repo_id(o.push_to_hub, res.strength)
            res.pushed = hub.push(res.out, repo, private=o.private, verify_required=True, log=log)
    return results


def _recorded_strength(loaded, recipes: list, mapset, budget, allow_extrapolation: bool, log) -> dict:
    """``--strength auto`` before any load: what ``actmerge tune`` recorded (``strength.auto``); {}
    when nothing is recorded and the recipe can be tuned after its fit."""
    if len(recipes) > 1 or loaded is None:
        raise RecipeError(
            "--strength auto tunes one recipe of a language model: bake a single --recipe (or the --maps "
            "file of one)."
        )
    model = loaded.source.name
    if recipes:
        key, name = recipes[0].content_hash(), recipes[0].name
    else:  # --maps: the strength `actmerge tune --maps` recorded for the recipe the maps came from
        key, name = mapset.recipe_hash, mapset.extra.get("recipe", "these maps")
    tuned = strength_rules.auto(model, key, budget, allow_extrapolation=allow_extrapolation, log=log)
    if tuned is None and not recipes:
        raise RecipeError(
            f"--strength auto with --maps: no strength recorded for {name} on {model} within "
            f"{budget.describe()}. Run `actmerge tune MODEL --recipe R --maps M` with the same budget first "
            "(it records one), or bake with --recipe R."
        )
    if tuned is None:
        log(f"no recorded tuning for {name} on {model} within {budget.describe()}: tuning after the fit")
    return tuned or {}


def verify(
    checkpoint: str | Path,
    *,
    base=None,
    maps: str | Path | MapSet | None = None,
    options: VerifyOptions = VerifyOptions(),
    progress: bool = True,
    log=print,
    pipe=None,
):
    """The hooked base vs the baked checkpoint reloaded in a fresh process that never imports actmerge
    (a pipeline: plain diffusers). Missing arguments (``base``, ``maps``, ``options.strength``) come
    from the checkpoint's ``actmerge/`` files; the base is loaded with the bake's recorded revision (or
    reused when ``base`` is a loaded model). ``options.runtime="llama.cpp"``: GGUF round trips of the
    baked checkpoint and of the unbaked base."""

    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        if checkpoint.suffix == ".gguf" and checkpoint.is_file():
            raise ModelResolutionError(
                f"{checkpoint} is a GGUF file: a GGUF output is verified as it is baked "
                "(`actmerge bake MODEL --recipe R -o X.gguf --verify`); `verify` takes a baked directory."
            )
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
    strength = options.strength
    if strength is None:
        strength = info.strength if info else _need("--strength")
    # any λ a bake may have used (an extrapolated one too), and no other
    strength = strength_rules.one(strength, allow_extrapolation=True)
    mapset = maps if isinstance(maps, MapSet) else MapSet.load(maps)
    kind = kind_of(checkpoint)  # its bake.json, else model_index.json
    if base is None:
        base = kind.default_base(info) if info else _need("--base")
    how = VerifyRequest(options, info, progress, log, pipe)
    return kind.verify(checkpoint, base, mapset, strength, how)


def _need(flag: str):
    raise ActmergeError(f"the checkpoint has no actmerge/bake.json to read this from: pass {flag}.")


def evaluate(
    model,
    *,
    recipe: str | Path | Recipe | None = None,
    maps: str | Path | MapSet | None = None,
    config: EvalConfig | None = None,
    options: EvalOptions = EvalOptions(),
    progress: bool = True,
    log=print,
) -> Report:
    """Sweep hooked strengths and baked checkpoints on identical prompts; write report.json and sweep.png
    into the report directory ``options.out`` (``options.force``: replace an eval or tune report
    there). The evaluation settings: ``config`` as given, or the recipe's under ``options.settings``.
    ``options.lm_eval``: lm-evaluation-harness tasks on the base and each baked directory
    (``evaluation.lmeval.scores``), into those rows' metrics and the card of each checkpoint actmerge wrote."""
    from .evaluation import write
    from .evaluation.sweep import SweepRows, run_sweep

    o = options
    baked, out = list(o.baked), o.out
    check_eval_paths(baked, out)  # before any slow load
    strengths = strength_rules.check(o.strengths, allow_extrapolation=o.allow_extrapolation, warn=log)
    loaded = load(model, revision=o.revision, placement=o.placement, log=log)
    sources = [loaded.source.path, *baked, *([maps] if isinstance(maps, str | Path) else [])]
    if out is not None:
        check_output(out, sources, force=o.force)
    recipe_obj = (
        load_recipe(recipe, log=log) if recipe is not None and not isinstance(recipe, Recipe) else recipe
    )
    cfg = config or eval_config(recipe_obj, o.settings)
    mapset, support = None, None
    if maps is not None:
        mapset = maps if isinstance(maps, MapSet) else MapSet.load(maps)
        preflight_maps(mapset, loaded.source, log)
    elif recipe_obj is not None and strengths:
        fitted = fit(loaded, recipe_obj, progress=progress, log=log)
        mapset = fitted.maps
        # ml-act's clamped variant needs the source support, which only a fresh Linear-AcT fit knows
        if o.clamped and recipe_obj.method == "linear_act":
            support = getattr(fitted.report, "support", None)
    m, tok = loaded.get()
    cfg = chat_prompts(cfg, tok, log)
    rows = SweepRows(
        maps=mapset,
        strengths=strengths,
        baked=baked,
        include_base=o.include_base,
        support=support,
        placement=o.placement,
    )
    report = run_sweep(m, tok, cfg, rows, model_name=loaded.source.name, progress=progress, log=log)
    if o.lm_eval:
        from .evaluation.lmeval import add_rows

        add_rows(
            report, loaded.source.path, m, list(o.lm_eval), baked, o.lm_eval_include, o.lm_eval_limit, log
        )
    if out is not None:
        write.eval_dir(out, report, source=sources, force=o.force, log=log)
    return report


def sites(
    model: str | None = None, *, targets=(), revision: str | None = None, log=print
) -> tuple[str, list[dict]]:
    """(title, rows): where a scale and a shift fold for this model's config, or for a pipeline's
    components. Without a model: the site vocabulary of every architecture row."""
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
    return kind_of(model, revision).capabilities(model, frozenset(targets), revision, log)


def plan(source, maps: MapSet, strength: float, options: FoldOptions = FoldOptions()) -> FoldPlan:
    """The fold plan of ``maps`` at ``strength`` for a resolved model's source (a ``ModelSource`` or a
    ``PipelineSource``): what ``bake --dry-run`` prints."""
    return kind_of(source).plan(source, maps, strength, options)
