"""The cost budget of ``actmerge tune``, and how one strength's measured cost is judged against it.

A strength's cost is measured per neutral tuning text (``TextCosts``): the steered − base summed
next-token NLL and the summed KL(base ‖ steered), each with the number of tokens it is summed over.
The point estimates are the whole-text values: perplexity ratio exp(Σ ΔNLL / Σ tokens), which is
exactly steered perplexity / base perplexity over the texts, and per-token KL Σ KL / Σ positions.

The texts are a sample, so a point estimate that just meets the budget exceeds it on other text about
half the time. ``judge`` therefore bootstraps over the texts: ``RESAMPLES`` resamples of the texts
with replacement (seed ``SEED``, the same resamples at every λ, so a run is deterministic), each giving
the same whole-text ratio; the ``confidence`` interval is the (1 − c)/2 … (1 + c)/2 quantiles of the
resampled values (widened to contain the point estimate). A strength is within the budget when the
upper end of its interval is — a one-sided bound at level (1 + c)/2 ≥ c. ``confidence`` 0 judges the
point estimate alone (tune's rule before the interval); so does a cost given without per-text terms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import RecipeError

Cost = dict[str, float]  # {"perplexity_ratio": …, "kl": …, "first_token_kl": …}
Interval = dict[str, list[float]]  # {"perplexity_ratio": [low, high], "kl": [low, high]}; {}: none
DEFAULT_CONFIDENCE = 0.95
MAX_CONFIDENCE = 0.99  # beyond, RESAMPLES leaves too few resamples in the tail to place the bound
RESAMPLES = 1000
SEED = 0


@dataclass(frozen=True)
class Budget:
    """The cost a tuned strength may spend: perplexity ratio to the base and/or per-token KL (nats)
    on the tuning neutral text (both given: both must hold), judged on the upper end of the
    ``confidence`` bootstrap interval over the texts (0: on the point estimate)."""

    max_ppl_ratio: float | None = 1.10
    max_kl: float | None = None
    confidence: float = DEFAULT_CONFIDENCE

    def __post_init__(self):
        if self.max_ppl_ratio is None and self.max_kl is None:
            raise RecipeError("a tuning budget needs --max-ppl-ratio or --max-kl.")
        for flag, v, eg in (
            ("--max-ppl-ratio", self.max_ppl_ratio, "1.10"),
            ("--max-kl", self.max_kl, "0.05"),
        ):
            if v is not None and not math.isfinite(v):
                raise RecipeError(f"{flag} {v} is not a finite number: give a budget, e.g. {eg}.")
        if self.max_ppl_ratio is not None and self.max_ppl_ratio <= 1:
            raise RecipeError(
                f"--max-ppl-ratio {self.max_ppl_ratio} ≤ 1: only λ = 0 meets it; use e.g. 1.10."
            )
        if self.max_kl is not None and self.max_kl <= 0:
            raise RecipeError(f"--max-kl {self.max_kl} ≤ 0: only λ = 0 meets it; use e.g. 0.05.")
        c = self.confidence
        if isinstance(c, bool) or not isinstance(c, int | float) or not 0 <= c <= MAX_CONFIDENCE:
            shown = f"{c:g}" if isinstance(c, int | float) else repr(c)
            raise RecipeError(
                f"--confidence {shown}: give a level in [0, {MAX_CONFIDENCE:g}], e.g. {DEFAULT_CONFIDENCE:g} "
                "(0: judge the point estimate on the tuning text alone)."
            )

    def ok(self, cost: Cost, interval: Interval | None = None) -> bool:
        """Within the budget: each budgeted cost's upper interval end (its point estimate where
        ``interval`` has none) is at most its limit."""
        interval = interval or {}
        for name, limit in (("perplexity_ratio", self.max_ppl_ratio), ("kl", self.max_kl)):
            value = interval[name][1] if name in interval else cost[name]
            if limit is not None and value > limit:
                return False
        return True

    def key(self) -> str:
        """The record key (``strength.remember``); confidence 0 keeps the key of the point rule."""
        parts = []
        if self.max_ppl_ratio is not None:
            parts.append(f"ppl<={self.max_ppl_ratio:g}")
        if self.max_kl is not None:
            parts.append(f"kl<={self.max_kl:g}")
        return ",".join(parts) + (f"@{self.confidence:g}" if self.confidence else "")

    def describe(self) -> str:
        parts = []
        if self.max_ppl_ratio is not None:
            parts.append(f"perplexity ≤ ×{self.max_ppl_ratio:g}")
        if self.max_kl is not None:
            parts.append(f"KL ≤ {self.max_kl:g} nats/token")
        return " and ".join(parts) + (f" at {self.level()} confidence" if self.confidence else "")

    def level(self) -> str:
        """The confidence as reports write it: ``95 %``."""
        return f"{round(self.confidence * 100, 4):g} %"


@dataclass(frozen=True)
class TextCosts:
    """One strength's cost, per neutral text (same order, one entry per text): ``tokens`` predicted
    and the steered − base NLL summed over them (nats); ``kl_positions`` and KL(base ‖ steered)
    summed over them; ``first_token_kl`` is reported, not budgeted (no interval)."""

    tokens: tuple[int, ...]
    nll_delta: tuple[float, ...]
    kl_positions: tuple[int, ...]
    kl: tuple[float, ...]
    first_token_kl: float = 0.0

    def point(self) -> Cost:
        return {
            "perplexity_ratio": math.exp(sum(self.nll_delta) / max(sum(self.tokens), 1)),
            "kl": max(sum(self.kl), 0.0) / max(sum(self.kl_positions), 1),
            "first_token_kl": self.first_token_kl,
        }

    def ratios(self) -> list[float]:
        """Each text's own perplexity ratio (steered / base on that text alone)."""
        return [math.exp(d / max(n, 1)) for d, n in zip(self.nll_delta, self.tokens, strict=True)]


def bootstrap(costs: TextCosts, confidence: float) -> Interval:
    """The ``confidence`` interval of the perplexity ratio and the per-token KL over resamples of the
    texts (module docstring); {} when there are no texts or ``confidence`` is 0."""
    import numpy as np

    n = len(costs.tokens)
    if n == 0 or not confidence:
        return {}
    idx = np.random.default_rng(SEED).integers(0, n, size=(RESAMPLES, n))  # [RESAMPLES, n]
    point = costs.point()
    quantiles = [(1 - confidence) / 2, (1 + confidence) / 2]

    def interval(name: str, num, den, f) -> list[float]:
        sums = np.asarray(num, dtype=np.float64)[idx].sum(1)
        counts = np.maximum(np.asarray(den, dtype=np.float64)[idx].sum(1), 1)
        low, high = np.quantile(f(sums / counts), quantiles)
        return [min(float(low), point[name]), max(float(high), point[name])]

    return {
        "perplexity_ratio": interval("perplexity_ratio", costs.nll_delta, costs.tokens, np.exp),
        "kl": interval("kl", costs.kl, costs.kl_positions, lambda x: np.maximum(x, 0.0)),
    }


def judge(measured: Cost | TextCosts, budget: Budget) -> tuple[Cost, Interval, bool]:
    """(point estimates, interval, within the budget) of one strength's measured cost."""
    if isinstance(measured, TextCosts):
        cost, interval = measured.point(), bootstrap(measured, budget.confidence)
    else:
        cost, interval = dict(measured), {}
    return cost, interval, budget.ok(cost, interval)
