"""The tune verb: pick the strength for the user, the strongest steering whose cost stays within a
budget.

``tune`` fits the recipe once (or takes fitted maps), then previews the maps with hooks at several
strengths on the recipe's *tuning* split only (``probe``) — ``tune_prompts`` for the behaviour metric,
``tune_neutral`` for the cost (perplexity ratio to the base, KL(base ‖ steered)); the eval prompts are
never read. The cost is measured per neutral text and a strength is within the budget when the
upper end of the bootstrap interval over the texts is (``budget.judge``; ``Budget.confidence`` 0: the
point estimate); ``search`` walks the grid and bisects. The behaviour metric (toxic fraction, concept
presence) is measured at the grid points and at the chosen point, for the trade-off curve
(``tune.png`` beside ``tune.json``, ``plot.plot_tradeoff``).

The result is also recorded in the cache (``strength.remember``: ``tuned/<model>-<recipe hash>.json``),
where ``bake --strength auto`` picks it up for the same model, recipe and budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .. import strength as strength_rules
from ..options import TuneOptions
from ..recipe import Recipe, load_recipe
from .budget import Budget, Cost, TextCosts
from .probe import HookedProbe, behaviour_name, tuning_split
from .records import TuneResult
from .search import Point, check_search, point_at, search


def tune(
    model,
    recipe: str | Path | Recipe,
    *,
    maps=None,
    options: TuneOptions = TuneOptions(),
    cost_fn: Callable[[float], Cost | TextCosts] | None = None,
    behaviour_fn: Callable[[float], float] | None = None,
    progress: bool = True,
    log=print,
) -> TuneResult:
    """Fit the recipe once (or use ``maps``), search the strongest λ within ``options.budget`` on the
    tuning split, write ``options.out``/tune.json + tune.png, and record the choice for
    ``bake --strength auto`` (``options.record``). ``cost_fn``/``behaviour_fn`` (λ → per-text
    ``TextCosts`` or a cost dict / metric value) replace the hooked measurements.
    ``options.curve`` False: the behaviour only at λ = 0 and the chosen λ (the choice needs only the cost, which
    takes forwards on the neutral text; the behaviour takes generations)."""
    from .. import fitting
    from ..io.output import check_output
    from ..maps import MapSet
    from . import write

    o = options
    max_strength, step, tol, out, curve = o.max_strength, o.step, o.tol, o.out, o.curve
    check_search(max_strength, step, tol, allow_extrapolation=o.allow_extrapolation)  # before any load
    budget = o.budget or Budget()
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    loaded = fitting.load(model, log=log)
    sources = [loaded.source.path, *([maps] if isinstance(maps, str | Path) else [])]
    if out is not None:
        check_output(out, sources, force=o.force)  # before the fit
    prompts, neutral = tuning_split(recipe)
    metric = behaviour_name(recipe)
    if maps is None and (cost_fn is None or behaviour_fn is None):
        maps = fitting.fit(loaded, recipe, progress=progress, log=log).maps
    elif maps is not None and not isinstance(maps, MapSet):
        maps = MapSet.load(maps)
        fitting.preflight_maps(maps, loaded.source, log)
    if cost_fn is None or behaviour_fn is None:
        probe = HookedProbe(loaded, recipe, maps, prompts, neutral, progress=progress)
        cost_fn = cost_fn or probe.text_costs
        behaviour_fn = behaviour_fn or probe.behaviour
    base_behaviour = behaviour_fn(0.0)
    log(
        f"tuning split: {len(prompts)} prompts, {len(neutral)} neutral texts; base {metric} = {base_behaviour:.3g}"
    )
    log(f"budget: {budget.describe()} (on the tuning neutral text)")

    def show(p: Point) -> None:
        if p.stage == "grid" and curve:
            p.behaviour = behaviour_fn(p.strength)
        c = p.cost
        beh = f", {metric} {p.behaviour:.3g}" if p.behaviour is not None else ""
        ci = {k: f" [{lo:{f}}, {hi:{f}}]" for k, f in (("perplexity_ratio", ".4f"), ("kl", ".4g"))
              if k in p.interval for lo, hi in [p.interval[k]]}  # fmt: skip
        log(
            f"  λ={p.strength:<7.4g} ppl ×{c['perplexity_ratio']:.4f}{ci.get('perplexity_ratio', '')}, "
            f"KL {c['kl']:.4g}{ci.get('kl', '')}{beh} {'within' if p.within else 'OVER'} budget ({p.stage})"
        )

    lam, met, points = search(
        cost_fn,
        budget,
        max_strength=max_strength,
        step=step,
        tol=tol,
        allow_extrapolation=o.allow_extrapolation,
        on_point=show,
    )
    if not met:
        low = min(points, key=lambda p: p.strength)
        high = {k: f" (up to {hi:.3g})" for k, (_, hi) in low.interval.items()}
        note = (
            f"no strength above 0 meets the budget ({budget.describe()}): even λ = {low.strength:g} "
            f"costs ppl ×{low.cost['perplexity_ratio']:.3f}{high.get('perplexity_ratio', '')}, "
            f"KL {low.cost['kl']:.3g}{high.get('kl', '')}. "
            "Loosen the budget, or make the recipe gentler (fewer sites, sparsity l1/group)."
        )
        points.insert(0, point_at(0.0, cost_fn, budget, behaviour=base_behaviour))
    elif all(p.within for p in points):
        note = f"the budget does not bind up to λ = {max_strength:g} (--max-strength): chose the largest."
    else:
        note = f"the strongest λ within the budget, to ±{tol:g}."
    if budget.confidence:
        note += (
            f" Judged on the upper end of the {budget.level()} bootstrap interval over the "
            f"{len(neutral)} tuning neutral texts."
        )
    chosen = next(p for p in points if p.strength == lam)
    if chosen.behaviour is None:
        chosen.behaviour = behaviour_fn(lam)
    log(("" if met else "WARNING: ") + note)
    result = TuneResult(
        model=loaded.source.name,
        recipe=recipe.name,
        recipe_hash=recipe.content_hash(),
        budget=budget,
        metric=metric,
        strength=lam,
        met=met,
        points=points,
        base_behaviour=base_behaviour,
        note=note,
        n_tune_prompts=len(prompts),
        n_tune_neutral=len(neutral),
        maps=maps,
    )
    if out is not None:
        write.tune_dir(out, result, source=sources, force=o.force, log=log)
    if o.record:
        strength_rules.remember(result)
        if isinstance(maps, MapSet) and maps.recipe_hash and maps.recipe_hash != result.recipe_hash:
            # also findable from the maps file (`bake --maps M --strength auto`), fitted by an earlier
            # version of the recipe
            strength_rules.remember(replace(result, recipe_hash=maps.recipe_hash))
    return result
