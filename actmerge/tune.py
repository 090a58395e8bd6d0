"""Pick the strength for the user: the strongest steering whose cost stays within a budget.

``tune`` fits the recipe once (or takes fitted maps), then previews the maps with hooks at several
strengths on the recipe's *tuning* split only — ``tune_prompts`` for the behaviour metric,
``tune_neutral`` for the cost (perplexity ratio to the base, KL(base ‖ steered)); the eval prompts are
never read. The cost is measured per neutral text and a strength is within the budget when the
upper end of the bootstrap interval over the texts is (``budget.judge``; ``Budget.confidence`` 0: the
point estimate). The cost grows with λ, so a coarse grid finds the first strength over the budget and
bisection narrows the boundary down to ``tol``; the chosen strength is the largest one measured
within the budget. The search is bounded (at most ``MAX_GRID`` grid points and ``MAX_BISECT``
bisection steps; ``check_search`` refuses options beyond that before any load). The behaviour metric (toxic fraction, concept presence) is measured at the grid
points and at the chosen point, for the trade-off curve (``tune.png`` beside ``tune.json``).

The result is also recorded in the cache (``strength.remember``: ``tuned/<model>-<recipe hash>.json``),
where ``bake --strength auto`` picks it up for the same model, recipe and budget.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from . import __version__
from . import strength as strength_rules
from .budget import Budget, Cost, Interval, TextCosts, judge
from .errors import RecipeError
from .options import TuneOptions
from .recipe import Recipe, load_recipe, read_sentences

MAX_GRID = 64  # grid points: --max-strength / --step
MAX_BISECT = 20  # bisection steps below the grid step: log2(step / tol)
MIN_TOL = 1e-6  # tune records λ to 6 decimals


@dataclass
class Point:
    strength: float
    cost: Cost
    within: bool
    behaviour: float | None = None  # measured at grid points and at the chosen point
    stage: str = "grid"  # grid | bisect
    interval: Interval = field(default_factory=dict)  # the bootstrap interval of the cost ({}: none)


@dataclass
class TuneResult:
    model: str
    recipe: str
    recipe_hash: str
    budget: Budget
    metric: str  # the behaviour metric, e.g. toxic_fraction
    strength: float  # the chosen λ (0 when nothing above 0 meets the budget)
    met: bool  # False: even the smallest strength tried is over the budget
    points: list[Point]
    base_behaviour: float | None = None
    note: str = ""
    n_tune_prompts: int = 0
    n_tune_neutral: int = 0
    version: str = __version__
    maps: object = field(default=None, repr=False)  # the fitted MapSet (not saved)

    @property
    def chosen(self) -> Point:
        return next(p for p in self.points if p.strength == self.strength)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "maps"}
        d["budget"] = {**asdict(self.budget), "key": self.budget.key(), "text": self.budget.describe()}
        d["chosen"] = asdict(self.chosen)
        return json.loads(json.dumps(d))

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def grid_size(max_strength: float, step: float) -> int:
    return max(1, round(max_strength / step))


def check_search(max_strength: float, step: float, tol: float, *, allow_extrapolation: bool = False) -> None:
    """The search options, before any load: ``--max-strength`` passes the strength rules and is > 0,
    ``--step`` and ``--tol`` are finite and > 0, and the search stays bounded (≤ ``MAX_GRID`` grid
    points, ≤ ``MAX_BISECT`` bisection steps). One-line ``RecipeError`` naming the option and a remedy."""
    for flag, v, default in (("--step", step, 0.25), ("--tol", tol, 0.02)):
        if not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
            shown = f"{v:g}" if isinstance(v, int | float) else repr(v)
            raise RecipeError(f"{flag} {shown}: give a finite number > 0 (default {default:g}).")
    top = strength_rules.one(max_strength, allow_extrapolation=allow_extrapolation, what="--max-strength")
    if top == 0:
        raise RecipeError("--max-strength 0: only λ = 0 would be tried; give the largest λ to try, e.g. 2.")
    if grid_size(top, step) > MAX_GRID:
        raise RecipeError(
            f"--step {step:g} up to --max-strength {top:g} is {grid_size(top, step)} grid points (at most "
            f"{MAX_GRID}): use --step ≥ {top / MAX_GRID:.3g}."
        )
    steps = math.ceil(math.log2(min(step, top) / tol)) if tol < min(step, top) else 0
    if tol < MIN_TOL or steps > MAX_BISECT:
        floor = max(min(step, top) / 2**MAX_BISECT, MIN_TOL)
        raise RecipeError(
            f"--tol {tol:g} is finer than tune resolves (at most {MAX_BISECT} bisection steps below "
            f"--step {step:g}, λ to 6 decimals): use --tol ≥ {floor:.2g}."
        )


def search(
    cost_fn: Callable[[float], Cost | TextCosts],
    budget: Budget,
    *,
    max_strength: float = 2.0,
    step: float = 0.25,
    tol: float = 0.02,
    allow_extrapolation: bool = False,
    on_point: Callable[[Point], None] = lambda p: None,
) -> tuple[float, bool, list[Point]]:
    """Coarse grid (step, up to ``max_strength``) until the first strength over the budget, then
    bisection between the last one within it and that one until they are ``tol`` apart.
    Returns (chosen λ, budget met above 0, points in the order measured). Assumes the cost grows with λ.
    ``cost_fn`` gives per-text costs (judged on their bootstrap interval) or point estimates (judged on
    themselves). Options are checked first (``check_search``); at most ``MAX_GRID + MAX_BISECT``
    measurements."""
    check_search(max_strength, step, tol, allow_extrapolation=allow_extrapolation)
    points: list[Point] = []

    def measure(lam: float, stage: str) -> Point:
        p = point_at(lam, cost_fn, budget, stage=stage)
        points.append(p)
        on_point(p)
        return p

    lo, hi = 0.0, None
    for i in range(1, grid_size(max_strength, step) + 1):
        lam = min(i * step, max_strength)
        if measure(lam, "grid").within:
            lo = lam
        else:
            hi = lam
            break
    if hi is None:  # within budget all the way: the budget does not bind below max_strength
        return round(lo, 6), True, points
    for _ in range(MAX_BISECT):  # check_search keeps log2(step / tol) within this bound
        if hi - lo <= tol:
            break
        mid = (lo + hi) / 2
        if measure(mid, "bisect").within:
            lo = mid
        else:
            hi = mid
    return round(lo, 6), lo > 0, points


def point_at(lam: float, cost_fn: Callable[[float], Cost | TextCosts], budget: Budget, **kw) -> Point:
    """One strength measured and judged against ``budget``."""
    cost, interval, within = judge(cost_fn(lam), budget)
    return Point(round(lam, 6), cost, within, interval=interval, **kw)


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
    from . import fitting
    from .io.output import check_output, write_report_dir
    from .maps import MapSet

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

        def write(tmp: Path) -> None:
            result.save(tmp / "tune.json")
            plot_tradeoff(result, tmp / "tune.png")

        write_report_dir(out, "tune", write, source=sources, force=o.force, log=log)
    if o.record:
        strength_rules.remember(result)
        if isinstance(maps, MapSet) and maps.recipe_hash and maps.recipe_hash != result.recipe_hash:
            # also findable from the maps file (`bake --maps M --strength auto`), fitted by an earlier
            # version of the recipe
            strength_rules.remember(replace(result, recipe_hash=maps.recipe_hash))
    return result


def tuning_split(recipe: Recipe) -> tuple[list[str], list[str]]:
    """The recipe's tuning prompts and tuning neutral text (never its eval prompts)."""
    missing = [f for f in ("tune_prompts", "tune_neutral") if getattr(recipe, f) is None]
    if missing:
        raise RecipeError(
            f"recipe {recipe.name!r} has no {' / '.join(missing)}: tuning needs its own split, never the "
            "eval prompts. Add e.g. `tune_prompts: data/detox/tune_prompts.txt` and "
            "`tune_neutral: data/neutral_tune.txt` to the recipe."
        )
    return read_sentences(recipe.path(recipe.tune_prompts)), read_sentences(recipe.path(recipe.tune_neutral))


def behaviour_name(recipe: Recipe) -> str:
    if "toxicity" in recipe.metrics:
        return "toxic_fraction"
    if "concept" in recipe.metrics:
        return "concept_presence"
    raise RecipeError(f"recipe {recipe.name!r}: tuning needs a behaviour metric (toxicity or concept).")


class HookedProbe:
    """Hooked previews of ``maps`` on the base model: cost on the neutral text, behaviour on prompts."""

    def __init__(self, loaded, recipe: Recipe, maps, prompts: list[str], neutral: list[str], progress=True):
        from .evaluate import get_scorer, text_nll

        self.model, self.tok = loaded.get()
        self.recipe, self.maps, self.prompts, self.neutral = recipe, maps, prompts, neutral
        self.progress = progress
        self.scorer = get_scorer(recipe.scorer) if "toxicity" in recipe.metrics else None
        concept = recipe.keywords and "concept" in recipe.metrics  # as Recipe.used_paths ships it
        self.keywords = read_sentences(recipe.path(recipe.keywords)) if concept else []
        self.base_nll = text_nll(self.model, self.tok, neutral)  # per text: (NLL, tokens)
        self.cache: dict[float, float] = {}

    def text_costs(self, lam: float) -> TextCosts:
        """The cost of λ per neutral text: ΔNLL and KL sums with their token counts (``TextCosts``)."""
        from .evaluate import logit_kl, neutral_prompts, text_kl, text_nll
        from .kinds.llm.hooks import steer
        from .placement import input_device

        tokens = tuple(n for _, n in self.base_nll)
        if lam == 0:
            zero = (0.0,) * len(tokens)
            return TextCosts(tokens, zero, tokens, zero)
        with steer(self.model, self.maps, lam):
            steered_nll = text_nll(self.model, self.tok, self.neutral)

        def base(enc):
            return self.model(**enc).logits

        def steered(enc):
            with steer(self.model, self.maps, lam):
                return self.model(**enc).logits

        device = input_device(self.model)
        kl = text_kl(base, steered, self.tok, self.neutral, device=device)
        first = logit_kl(
            base, steered, self.tok, neutral_prompts(self.neutral), device=device, last_only=True
        )
        return TextCosts(
            tokens=tokens,
            nll_delta=tuple(s - b for (s, _), (b, _) in zip(steered_nll, self.base_nll, strict=True)),
            kl_positions=tuple(n for _, n in kl),
            kl=tuple(k for k, _ in kl),
            first_token_kl=first,
        )

    def cost(self, lam: float) -> Cost:
        """The point estimates of ``text_costs``: perplexity ratio, KL, first-token KL."""
        return self.text_costs(lam).point()

    def behaviour(self, lam: float) -> float:
        from contextlib import nullcontext

        from .evaluate import concept_presence, continuations
        from .kinds.llm.hooks import steer

        if lam in self.cache:
            return self.cache[lam]
        ctx = steer(self.model, self.maps, lam) if lam else nullcontext()
        with ctx:
            texts = continuations(
                self.model,
                self.tok,
                self.prompts,
                max_new_tokens=self.recipe.eval_max_new_tokens,
                seed=self.recipe.seed,
                progress=self.progress,
            )
        if self.scorer is not None:
            scores = self.scorer(texts)
            value = sum(s > 0.5 for s in scores) / max(len(scores), 1)
        else:
            value = concept_presence(texts, self.keywords)
        self.cache[lam] = value
        return value


def plot_tradeoff(result: TuneResult, path: Path) -> Path:
    """tune.png: behaviour metric vs cost (perplexity ratio; KL beside it), the chosen point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8))
    pts = sorted((p for p in result.points if p.behaviour is not None), key=lambda p: p.strength)
    base = Point(0.0, {"perplexity_ratio": 1.0, "kl": 0.0}, True, result.base_behaviour)
    if result.base_behaviour is not None and all(p.strength != 0 for p in pts):
        pts = [base, *pts]
    for ax, cost, limit, label in (
        (axes[0], "perplexity_ratio", result.budget.max_ppl_ratio, "perplexity ratio to base"),
        (axes[1], "kl", result.budget.max_kl, "KL(base ‖ steered), nats/token"),
    ):
        ax.plot([p.cost[cost] for p in pts], [p.behaviour for p in pts], "o-", label="hooked preview")
        for p in pts:  # the bootstrap interval over the tuning texts
            if cost in p.interval:
                ax.plot(p.interval[cost], [p.behaviour] * 2, "|-", color="C0", alpha=0.5)
        for p in pts:
            ax.annotate(f"λ={p.strength:g}", (p.cost[cost], p.behaviour), fontsize=7, alpha=0.7)
        c = result.chosen
        ax.plot(
            [c.cost[cost]],
            [c.behaviour],
            "*",
            color="crimson",
            markersize=15,
            label=f"chosen λ={c.strength:g}",
        )
        if limit is not None:
            ax.axvline(limit, color="gray", linestyle="--", label="budget")
        ax.set_xlabel(label)
        ax.set_ylabel(result.metric.replace("_", " ") + " (tuning prompts)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result.model} · {result.recipe}: behaviour vs cost ({result.budget.describe()})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
