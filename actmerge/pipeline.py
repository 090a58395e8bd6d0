"""The verbs — fit, plan, bake, verify — as a library API a notebook can call. The CLI is a thin
layer over these functions."""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import __version__, card
from .checkpoint import PROVENANCE_DIR, tensor_index, write_checkpoint
from .collect import FitReport
from .collect import fit as fit_maps
from .errors import MapsMismatchError, PlacementError, RecipeError, VerificationError
from .fold import FoldPlan, describe, shift_home
from .fold import plan as make_plan
from .maps import MapSet, compose
from .models import ModelSource, load_model, resolve
from .placement import from_pretrained_kwargs, offloaded, pick_device
from .recipe import Recipe, load_recipe, read_sentences
from .sites import Site, architecture_for, resolve_sites, site_for_key
from .sweep import EvalConfig, Report, markdown_table, plot, run_sweep
from .verify import DEFAULT_PROMPTS, TOLERANCE, VerifyReport, compare, hooked_outputs, run_fresh

NEUTRAL_TEXT = Path(__file__).resolve().parent / "data" / "neutral.txt"


@dataclass
class Loaded:
    """A resolved model with its (lazily) loaded transformers model and tokenizer.

    ``device``: None = cuda when present, else cpu. ``device_map``/``max_memory``/``offload_folder``:
    accelerate's dispatch for models larger than memory (``models.load_model``)."""

    source: ModelSource
    device: str | None = None
    _model: object = None
    _tok: object = None
    device_map: str | dict | None = None
    max_memory: str | dict | None = None
    offload_folder: str | Path | None = None

    def get(self):
        if self._model is None:
            self._model, self._tok = load_model(
                self.source,
                device=self.device,
                device_map=self.device_map,
                max_memory=self.max_memory,
                offload_folder=self.offload_folder,
            )
        return self._model, self._tok


def load(
    model: str | Loaded,
    *,
    revision: str | None = None,
    device: str | None = None,
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    offload_folder: str | Path | None = None,
    log=print,
) -> Loaded:
    """A model argument as a lazily loaded model (a ``Loaded`` passes through). The placement is
    checked here, before any slow work: a bad device, device map or ``max_memory`` fails at once."""
    if isinstance(model, Loaded):
        return model
    from_pretrained_kwargs(pick_device(device), device_map, max_memory, offload_folder)
    return Loaded(
        resolve(model, revision, log=log),
        device,
        device_map=device_map,
        max_memory=max_memory,
        offload_folder=offload_folder,
    )


def recipe_sites(recipe: Recipe, config: dict) -> list[Site]:
    arch = architecture_for(config)
    sites: list[Site] = []
    for spec in recipe.sites:
        sites += resolve_sites(arch, config, spec.names, spec.layers)
    sites += [site_for_key(arch, config, key) for key in recipe.modules]
    uniq = {s.key: s for s in sites}
    return sorted(uniq.values(), key=lambda s: s.order)


@dataclass
class FitResult:
    maps: MapSet
    report: FitReport
    recipe: Recipe
    seconds: float


def fit(
    model: str | Loaded,
    recipe: str | Path | Recipe,
    *,
    revision: str | None = None,
    device: str | None = None,
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    offload_folder: str | Path | None = None,
    progress: bool = True,
    log=print,
    targets=(),
    allow_flags: bool = True,
) -> FitResult:
    """Collect activations on the recipe's sentences and fit one map per site."""
    loaded = load(
        model,
        revision=revision,
        device=device,
        device_map=device_map,
        max_memory=max_memory,
        offload_folder=offload_folder,
        log=log,
    )
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    config = loaded.source.config
    sites = recipe_sites(recipe, config)
    source = recipe.read_source()[: recipe.max_sentences]
    target = recipe.read_target()[: recipe.max_sentences]
    m, tok = loaded.get()
    t0 = time.perf_counter()
    if recipe.method == "lineas" and "disk" in offloaded(m):
        raise PlacementError(
            "LinEAS back-propagates through every layer, so disk-offloaded weights would all be held "
            "for the backward pass: raise --max-memory until nothing goes to disk, or fit with "
            "linear_act / mean_act (forward passes only), which work with disk offload."
        )
    if recipe.method == "lineas":
        maps, report = _fit_lineas(
            m, tok, recipe, config, sites, source, target, targets, allow_flags, progress, log
        )
    else:
        maps, report = fit_maps(
            m,
            tok,
            sites,
            source,
            target,
            method=recipe.method,
            incremental=recipe.incremental,
            batch_size=recipe.batch_size,
            max_tokens=recipe.max_tokens,
            pooling=recipe.pooling,
            skip_special=recipe.skip_special_tokens,
            fit_shift=recipe.fit_shift,
            seed=recipe.seed,
            progress=progress,
        )
    seconds = time.perf_counter() - t0
    degenerate = getattr(report, "degenerate", 0)  # linear_act's guard; LinEAS has none
    mapset = MapSet(
        maps,
        base_model=loaded.source.name,
        method=recipe.method,
        recipe_hash=recipe.content_hash(),
        extra={
            "recipe": recipe.name,
            "n_source": str(len(source)),
            "n_target": str(len(target)),
            "degenerate_neurons": str(degenerate),
            "actmerge_version": __version__,
        },
    )
    log(
        f"fitted {len(maps)} maps ({sum(a.dim for a in maps.values())} neurons) on {len(source)} source / "
        f"{len(target)} target sentences in {seconds:.1f}s; degenerate neurons (shift-only fallback): {degenerate}"
    )
    return FitResult(mapset, report, recipe, seconds)


def frozen_shifts(
    recipe: Recipe, config: dict, sites: list[Site], targets=(), allow_flags: bool = True
) -> dict[str, str]:
    """Fold-aware fitting: site key → why its shift must stay 0 for this architecture/runtime set."""
    arch = architecture_for(config)
    if not recipe.fit_shift:
        return {s.key: "the recipe fits scale-only maps (fit_shift: false)" for s in sites}
    if not recipe.fold_aware:
        return {}
    allow = allow_flags and recipe.allow_config_change
    tg = frozenset(targets) | frozenset(recipe.targets)
    out = {}
    for s in sites:
        ok, why, _, _ = shift_home(arch, config, s.name, targets=tg, allow_flags=allow)
        if not ok:
            out[s.key] = why
    return out


def _fit_lineas(model, tok, recipe, config, sites, source, target, targets, allow_flags, progress, log):
    from .lineas import LineasConfig, fit_lineas

    frozen = frozen_shifts(recipe, config, sites, targets, allow_flags)
    o = recipe.lineas
    cfg = LineasConfig(
        steps=o.steps,
        lr=o.lr,
        lr_min=o.lr_min,
        batch=o.batch,
        l1=o.l1,
        group=o.group,
        loss_norm=o.loss_norm,
        param=o.param,
        seed=recipe.seed,
    )
    return fit_lineas(
        model,
        tok,
        sites,
        source,
        target,
        frozen_shift=frozen,
        cfg=cfg,
        max_tokens=recipe.max_tokens,
        pooling=recipe.pooling,
        skip_special=recipe.skip_special_tokens,
        progress=progress,
        log=log,
    )


def plan(
    source: ModelSource,
    maps: MapSet,
    strength: float,
    *,
    targets=(),
    shift_policy: str = "error",
    allow_flags: bool = True,
) -> FoldPlan:
    config = source.config
    infos, _ = tensor_index(source.safetensors_files())
    return make_plan(
        architecture_for(config),
        config,
        maps,
        strength,
        infos,
        targets=frozenset(targets),
        shift_policy=shift_policy,
        allow_flags=allow_flags,
    )


def baked_maps(maps: MapSet, fold_plan: FoldPlan) -> MapSet:
    """The maps the checkpoint really holds: shifts that the plan dropped are zero."""
    dropped = {sp.site.key for sp in fold_plan.sites if sp.exactness.startswith("scale only")}
    out = {k: (m.scale_only() if k in dropped else m) for k, m in maps.items()}
    return MapSet(out, maps.base_model, maps.method, maps.recipe_hash, dict(maps.extra))


@dataclass
class BakeResult:
    out: Path | None
    strength: float
    plan: FoldPlan
    seconds: float
    deviation: VerifyReport | None = None  # hooked full maps vs what was baked (shift dropped)
    evaluation: str = ""  # markdown table when evaluated after baking
    notes: list[str] = field(default_factory=list)


def bake(
    model: str | Loaded,
    *,
    recipe: str | Path | list[str | Path] | None = None,
    maps: str | Path | MapSet | None = None,
    strengths: list[float] | None = None,
    out: str | Path | None = None,
    targets=(),
    shift_policy: str = "error",
    allow_flags: bool = True,
    force: bool = False,
    dry_run: bool = False,
    revision: str | None = None,
    device: str | None = None,
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    offload_folder: str | Path | None = None,
    progress: bool = True,
    log=print,
    evaluate_after: bool = False,
    as_llama: bool = False,
    tune_budget=None,
) -> list[BakeResult]:
    """Fit (from a recipe) or load maps, plan the fold at each strength, and write checkpoints.

    Several recipes compose: each is fitted, applied at its own strength (``strengths`` gives one per
    recipe), the maps at shared sites compose (affine ∘ affine, in recipe order), and one checkpoint
    is baked. ``as_llama``: write a Mistral checkpoint in the Llama layout, where shifts fold into
    ``attention_bias``/``mlp_bias`` biases (``llama_layout.as_llama_config``). ``tune_budget`` (a
    ``tune.Budget``): ``--strength auto`` — the strength ``actmerge tune`` recorded for this model, recipe
    and budget, tuned now on the fitted maps if none is recorded."""
    recipes = [] if recipe is None else (list(recipe) if isinstance(recipe, list | tuple) else [recipe])
    if bool(recipes) == (maps is not None):
        raise RecipeError("give exactly one of a recipe (to fit) or a maps file (already fitted).")
    loaded = load(
        model,
        revision=revision,
        device=device,
        device_map=device_map,
        max_memory=max_memory,
        offload_folder=offload_folder,
        log=log,
    )
    if as_llama:
        from .llama_layout import LlamaLayout, as_llama_config

        src = loaded.source
        as_llama_config(src.config)  # refuse (not Mistral, a binding sliding window) before the slow fit
        layout = LlamaLayout(src.name, src.path, src.revision)
        loaded = replace(loaded, source=layout)
    recipe_objs = [load_recipe(r) for r in recipes]
    recipe_obj = recipe_objs[0] if recipe_objs else None
    per_recipe: list[float] = []
    if len(recipe_objs) > 1:
        per_recipe = strengths or [r.strength for r in recipe_objs]
        if len(per_recipe) != len(recipe_objs):
            raise RecipeError(
                f"{len(recipe_objs)} recipes need {len(recipe_objs)} strengths (one each), got {per_recipe}."
            )
        strengths = [1.0]  # the composed maps already hold each recipe's strength
    strengths = strengths or [recipe_obj.strength if recipe_obj else 1.0]
    for lam in strengths:
        if lam < 0:
            raise RecipeError(
                f"strength {lam} < 0: use 0 (identity) to 1 (full transport), or >1 to extrapolate."
            )
        if lam > 1:
            warnings.warn(
                f"strength {lam} > 1 extrapolates the transport beyond the target distribution.", stacklevel=2
            )
    if evaluate_after and (recipe_obj is None or recipe_obj.eval_prompts is None):
        raise RecipeError("--eval needs a recipe with `eval_prompts:` (use `actmerge eval` for maps files).")
    if not dry_run and out is None:
        raise RecipeError("give an output directory with -o/--out (or --dry-run to only print the plan).")
    if not dry_run:  # fail before the (slow) fit if the output cannot be written
        from .checkpoint import check_output

        for lam in strengths:
            check_output(_out_for(Path(out), lam, strengths), loaded.source.path, force)
    if len(recipe_objs) > 1:
        fitted = [
            fit(loaded, r, progress=progress, log=log, targets=targets, allow_flags=allow_flags).maps
            for r in recipe_objs
        ]
        mapset = compose_all(fitted, per_recipe)
    elif recipe_obj is not None:
        mapset = fit(
            loaded, recipe_obj, progress=progress, log=log, targets=targets, allow_flags=allow_flags
        ).maps
    else:
        mapset = maps if isinstance(maps, MapSet) else MapSet.load(maps)
        if not mapset.maps:
            raise MapsMismatchError("the maps file holds no maps.")
    tuned = None
    if tune_budget is not None:
        tuned = _auto_strength(loaded, recipe_obj, mapset, tune_budget, len(recipe_objs), progress, log)
        strengths = [tuned["strength"]]
    results = []
    for lam in strengths:
        t0 = time.perf_counter()
        fold_plan = plan(
            loaded.source, mapset, lam, targets=targets, shift_policy=shift_policy, allow_flags=allow_flags
        )
        if as_llama:
            from .llama_layout import LLAMA_LAYOUT_PATCH

            fold_plan.config_patch = {**LLAMA_LAYOUT_PATCH, **fold_plan.config_patch}
        held = baked_maps(mapset, fold_plan)
        res = BakeResult(None, lam, fold_plan, 0.0)
        if any(sp.exactness.startswith("scale only") for sp in fold_plan.sites):
            res.deviation = shift_drop_deviation(loaded, mapset, held, lam)
            res.notes.append(
                f"shift dropped at {sum(sp.exactness.startswith('scale only') for sp in fold_plan.sites)} sites: "
                f"max |Δlogit| vs the full maps = {res.deviation.max_abs_logit_diff:.3g}, "
                f"top-1 agreement {res.deviation.argmax_agreement:.1%}"
            )
        if not dry_run:
            dest = _out_for(Path(out), lam, strengths)
            res.out = write_baked(
                loaded.source,
                held,
                fold_plan,
                dest,
                recipe_path=recipes,
                force=force,
                progress=progress,
                tuned=tuned,
            )
        res.seconds = time.perf_counter() - t0
        if evaluate_after and res.out is not None:
            report = evaluate(
                loaded,
                baked=[res.out],
                config=eval_config(recipe_obj),
                include_base=True,
                progress=progress,
                log=log,
            )
            report.save(res.out / PROVENANCE_DIR / "eval.json")
            res.evaluation = markdown_table(report)
            (res.out / "README.md").write_text(
                model_card(loaded.source, held, fold_plan, recipes, res.evaluation, tuned)
            )
        results.append(res)
    return results


def _auto_strength(loaded, recipe, mapset, budget, n_recipes, progress, log) -> dict:
    """``--strength auto``: the recorded tuning for (model, recipe, budget), else tune the fitted maps."""
    from .tune import provenance, recall, tune

    if n_recipes != 1:
        raise RecipeError(
            "--strength auto tunes one recipe: bake a single --recipe (not --maps, not several)."
        )
    rec = recall(loaded.source.name, recipe.content_hash(), budget)
    if rec is None:
        log(
            f"no recorded tuning for {recipe.name} on {loaded.source.name} within {budget.describe()}: tuning now"
        )
        rec = tune(loaded, recipe, maps=mapset, budget=budget, progress=progress, log=log).to_dict()
    else:
        log(
            f"--strength auto: λ = {rec['strength']:g} (recorded by actmerge tune within {budget.describe()})"
        )
    if not rec["met"]:
        raise RecipeError(f"--strength auto: {rec['note']}")
    return provenance(rec)


def compose_all(mapsets: list[MapSet], strengths: list[float]) -> MapSet:
    """Apply each map set at its strength, in order; the result is meant for strength 1."""
    out = compose(mapsets[0], mapsets[1], (strengths[0], strengths[1]))
    for ms, lam in zip(mapsets[2:], strengths[2:], strict=True):
        out = compose(out, ms, (1.0, lam))
    out.extra = {
        "recipe": "+".join(m.extra.get("recipe", "?") for m in mapsets),
        "strengths": ",".join(f"{x:g}" for x in strengths),
    }
    return out


def _out_for(out: Path, lam: float, strengths: list[float]) -> Path:
    return out if len(strengths) == 1 else out / f"lambda-{lam:g}"


def write_baked(
    source: ModelSource,
    maps: MapSet,
    fold_plan: FoldPlan,
    out: Path,
    *,
    recipe_path=None,
    force: bool = False,
    progress: bool = True,
    evaluation: str = "",
    tuned: dict | None = None,
) -> Path:
    """Write checkpoint + provenance (maps, recipe, bake.json) + model card. ``tuned``: how
    ``--strength auto`` chose λ (``tune.provenance``), recorded in both."""
    from rich.progress import track

    with tempfile.TemporaryDirectory() as d:
        maps_bytes = maps.save(Path(d) / "maps.safetensors").read_bytes()
    rows = describe(fold_plan)
    bake_info = {
        "actmerge_version": __version__,
        "base_model": source.name,
        "revision": source.revision,
        "strength": fold_plan.strength,
        "method": maps.method,
        "recipe_hash": maps.recipe_hash,
        "config_patch": fold_plan.config_patch,
        "targets": sorted(fold_plan.targets),
        "runtimes": sorted(fold_plan.runtimes),
        "fold": rows,
    }
    if tuned is not None:
        bake_info["tuned"] = tuned
    extra = {
        f"{PROVENANCE_DIR}/maps.safetensors": maps_bytes,
        f"{PROVENANCE_DIR}/bake.json": (json.dumps(bake_info, indent=2) + "\n").encode(),
    }
    extra["README.md"] = model_card(source, maps, fold_plan, recipe_path, evaluation, tuned).encode()
    paths = _recipe_list(recipe_path)
    for i, rp in enumerate(paths):
        name = "recipe.yaml" if len(paths) == 1 else f"recipe-{i + 1}.yaml"
        extra[f"{PROVENANCE_DIR}/{name}"] = Path(rp).read_bytes()

    def bar(it, total, desc):
        return track(it, total=total, description=desc, transient=True) if progress else it

    return write_checkpoint(
        source.path,
        source.safetensors_files(),
        fold_plan,
        out,
        config_patch=fold_plan.config_patch,
        extra=extra,
        force=force,
        progress=bar,
    )


def model_card(
    source: ModelSource,
    maps: MapSet,
    fold_plan: FoldPlan,
    recipe_path=None,
    evaluation: str = "",
    tuned: dict | None = None,
) -> str:
    paths = _recipe_list(recipe_path)
    how = " ".join(f"--recipe {Path(r).name}" for r in paths) if paths else "--maps actmerge/maps.safetensors"
    strength = maps.extra.get("strengths", "") if len(paths) > 1 else f"{fold_plan.strength:g}"
    if tuned is not None:
        b = tuned["budget"]
        strength = "auto" + (f" --max-ppl-ratio {b['max_ppl_ratio']:g}" if b["max_ppl_ratio"] else "")
        strength += f" --max-kl {b['max_kl']:g}" if b["max_kl"] else ""
    return card.render(
        base_model=source.name,
        method=maps.method or "unknown",
        recipe_name=maps.extra.get("recipe", "custom"),
        strength=fold_plan.strength,
        plan_rows=describe(fold_plan),
        config_patch=fold_plan.config_patch,
        license=card.base_license(source.path, source.config),
        runtimes=sorted(fold_plan.runtimes),
        evaluation=evaluation,
        reproduce=f"actmerge bake {source.name} {how} --strength {strength} -o out/",
        tuned=tuned,
    )


def _recipe_list(recipe_path) -> list:
    if recipe_path is None:
        return []
    return list(recipe_path) if isinstance(recipe_path, list | tuple) else [recipe_path]


def shift_drop_deviation(loaded: Loaded, full: MapSet, held: MapSet, strength: float) -> VerifyReport:
    """How far the baked (scale-only where dropped) model is from the hooked full maps."""
    model, tok = loaded.get()
    ref = hooked_outputs(model, tok, DEFAULT_PROMPTS, full, strength)
    got = hooked_outputs(model, tok, DEFAULT_PROMPTS, held, strength)
    return compare(ref, got, float("inf"))


def verify(
    checkpoint: str | Path,
    *,
    base: str | Loaded | None = None,
    maps: str | Path | MapSet | None = None,
    strength: float | None = None,
    tolerance: float | None = None,
    prompts: list[str] | None = None,
    device: str | None = None,
    log=print,
    runtime: str = "transformers",
    outtype: str = "f32",
) -> VerifyReport:
    """Hooked base model vs the baked checkpoint reloaded by plain transformers in a fresh process.

    Missing arguments are read from the checkpoint's ``actmerge/bake.json`` and maps file.
    ``runtime="llama.cpp"``: the checkpoint exported to GGUF (``outtype``) and run in llama.cpp instead,
    next to the unbaked base's own round trip (returns a ``llamacpp.LlamaCppReport``).
    """
    checkpoint = Path(checkpoint)
    info_path = checkpoint / PROVENANCE_DIR / "bake.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if base is None:
        base = info.get("base_model") or _need("--base")
    if maps is None:
        maps = checkpoint / PROVENANCE_DIR / "maps.safetensors"
        if not maps.is_file():
            _need("--maps")
    if strength is None:
        strength = info.get("strength") if "strength" in info else _need("--strength")
    loaded = base if isinstance(base, Loaded) else Loaded(resolve(base, log=log), device)
    mapset = maps if isinstance(maps, MapSet) else MapSet.load(maps)
    if runtime != "transformers":
        return _verify_runtime(
            checkpoint, loaded, mapset, strength, runtime, outtype, tolerance, prompts, log
        )
    if tolerance is None:
        infos, _ = tensor_index(ModelSource("", checkpoint).safetensors_files())
        dtypes = {i.dtype for i in infos.values()}
        tolerance = max(TOLERANCE.get(d, 0.5) for d in dtypes)
    prompts = prompts or DEFAULT_PROMPTS
    model, tok = loaded.get()
    ref = hooked_outputs(model, tok, prompts, mapset, strength)
    got = run_fresh(checkpoint, prompts)
    report = compare(ref, got, tolerance)
    (checkpoint / PROVENANCE_DIR).mkdir(exist_ok=True)
    (checkpoint / PROVENANCE_DIR / "verify.json").write_text(report.to_json() + "\n")
    return report


def _need(flag: str):
    raise VerificationError(f"the checkpoint has no actmerge/bake.json to read this from: pass {flag}.")


def _verify_runtime(checkpoint, loaded, mapset, strength, runtime, outtype, tolerance, prompts, log):
    """``verify --runtime llama.cpp``: GGUF round trips of the baked checkpoint and of the unbaked base."""
    if runtime != "llama.cpp":
        raise VerificationError(f"--runtime {runtime!r}: choose transformers or llama.cpp.")
    from .llamacpp import verify_llamacpp

    model, tok = loaded.get()
    report = verify_llamacpp(
        checkpoint,
        model,
        loaded.source.path,
        tok,
        mapset,
        strength,
        prompts or DEFAULT_PROMPTS,
        outtype=outtype,
        tolerance=tolerance,
        log=log,
    )
    (checkpoint / PROVENANCE_DIR).mkdir(exist_ok=True)
    (checkpoint / PROVENANCE_DIR / "verify-llama.cpp.json").write_text(report.to_json() + "\n")
    return report


def eval_config(
    recipe: Recipe | None,
    *,
    prompts: list[str] | None = None,
    neutral: list[str] | None = None,
    metrics: list[str] | None = None,
    scorer: str | None = None,
    keywords: list[str] | None = None,
    max_new_tokens: int | None = None,
    sample: bool = False,
    seed: int | None = None,
    limit: int | None = None,
) -> EvalConfig:
    """Evaluation settings: the recipe's, overridden by explicit arguments."""

    def from_recipe(attr):
        if recipe is None or getattr(recipe, attr) is None:
            return None
        return read_sentences(recipe.path(getattr(recipe, attr)))

    explicit_prompts = prompts
    prompts = prompts or from_recipe("eval_prompts")
    if not prompts:
        raise RecipeError("no evaluation prompts: set `eval_prompts:` in the recipe or pass --prompts FILE.")
    metrics = metrics or (list(recipe.metrics) if recipe else ["toxicity", "perplexity"])
    neutral = neutral or from_recipe("neutral_text") or []
    if "perplexity" in metrics and not neutral:
        neutral = read_sentences(NEUTRAL_TEXT)
    keywords = keywords or from_recipe("keywords") or []
    default_tokens = 32 if sample else (recipe.eval_max_new_tokens if recipe else 24)
    hard = from_recipe("eval_prompts_hard") if explicit_prompts is None else None
    return EvalConfig(
        prompts=prompts[:limit] if limit else prompts,
        neutral=neutral,
        metrics=tuple(metrics),
        scorer=scorer or (recipe.scorer if recipe else "profanity"),
        keywords=tuple(keywords),
        max_new_tokens=max_new_tokens or default_tokens,
        sample=sample,
        seed=seed if seed is not None else (recipe.seed if recipe else 0),
        splits={"hard": hard[:limit] if limit else hard} if hard else {},
    )


def evaluate(
    model: str | Loaded,
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
    device: str | None = None,
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    offload_folder: str | Path | None = None,
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
    loaded = load(
        model,
        revision=revision,
        device=device,
        device_map=device_map,
        max_memory=max_memory,
        offload_folder=offload_folder,
        log=log,
    )
    recipe_obj = load_recipe(recipe) if recipe is not None else None
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
        _lm_eval_rows(report, loaded, m, list(lm_eval), baked, lm_eval_include, lm_eval_limit, log)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        report.save(out / "report.json")
        plot(report, out / "sweep.png")
    return report


def _lm_eval_rows(report: Report, loaded: Loaded, model, tasks, baked, include, limit, log) -> None:
    from . import lmeval
    from .placement import input_device
    from .sweep import add_baselines

    kw = dict(
        include=include,
        device=str(input_device(model)),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        limit=limit,
    )
    log(f"lm-eval {', '.join(tasks)}: base model")
    base = lmeval.scores(loaded.source.path, tasks, **kw)
    first = report.rows[0]
    if first.kind == "base" or first.strength == 0:  # the base model, or λ = 0 (the identity)
        first.metrics |= base
    for row, path in zip([r for r in report.rows if r.kind == "baked"], baked, strict=True):
        log(f"lm-eval {', '.join(tasks)}: {Path(path).name}")
        got = lmeval.scores(path, tasks, **kw)
        row.metrics |= got
        lmeval.add_to_card(Path(path) / "README.md", lmeval.card_section(got, base))
    add_baselines(report.rows)
