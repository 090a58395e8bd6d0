"""The strength search: the strongest λ whose cost stays within a budget. The cost grows with λ, so a
coarse grid finds the first strength over the budget and bisection narrows the boundary down to
``tol``; the chosen strength is the largest one measured within the budget. The search is bounded (at
most ``MAX_GRID`` grid points and ``MAX_BISECT`` bisection steps; ``check_search`` refuses options
beyond that before any load)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import strength as strength_rules
from ..errors import RecipeError
from .budget import Budget, Cost, Interval, TextCosts, judge

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
