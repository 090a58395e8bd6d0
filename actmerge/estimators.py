"""Estimators: pure functions ``(source [N, D], target [M, D]) → (AffineMap, FitInfo)``.

All arithmetic in float64; maps are returned in float32. The defaults compute what the authors'
reference code (apple/ml-act at d2c3560) computes; actmerge's own variants are opt-in:

- ``sample="balanced"`` (reference: ``ResponsesLoader.label_src_dst_subsets(balanced=True)``): every
  statistic comes from a seeded equal-count subsample of source and target. ``"all"``: mean_act and
  gaussian_act use every row (linear_act pairs by rank, so it always balances).
- ``degenerate="skip"`` (reference): linear_act leaves neurons whose (balanced) source is constant
  untouched (ml-act fits them with a noise-guarded ω that explodes, and its ``q_0_100`` clamp then
  moves no value: no value lies strictly inside ``[c, c]``); gaussian_act and mean_act leave neurons
  whose source *or* target std is ≤ 1e-4 untouched (``GaussianOTHook``/``OnlyMeanHook``,
  ``std_eps``). ``"shift"`` (actmerge's variant): neurons whose source std is below
  ``DEGENERATE_STD`` relative to their scale get ω = 1 and β = mean difference; mean_act moves all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import ActivationError
from .maps import AffineMap

# actmerge's "shift" policy: source std below this (relative to the neuron's scale) makes ω explode
DEGENERATE_STD = 1e-6
# ml-act's GaussianOTHook/OnlyMeanHook ``std_eps``: neurons with std ≤ this on either side are not moved
REFERENCE_STD_EPS = 1e-4

Degenerate = Literal["skip", "shift"]
Sample = Literal["balanced", "all"]


@dataclass(frozen=True)
class FitInfo:
    n_source: int
    n_target: int
    # neurons the degenerate-neuron policy handled: left untouched ("skip") or shift-only ("shift")
    degenerate: int = 0


Estimator = Callable[..., tuple[AffineMap, FitInfo]]


def _check(src: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if src.dim() != 2 or tgt.dim() != 2 or src.shape[1] != tgt.shape[1]:
        raise ActivationError(
            f"source {tuple(src.shape)} and target {tuple(tgt.shape)} must be [N, D] with one D."
        )
    if src.shape[0] < 2 or tgt.shape[0] < 2:
        raise ActivationError("need at least 2 source and 2 target sentences to fit a map.")
    if not (torch.isfinite(src).all() and torch.isfinite(tgt).all()):
        raise ActivationError("non-finite activations: cannot fit maps on NaN/Inf.")
    return src.double(), tgt.double()


def equal_counts(src: torch.Tensor, tgt: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Subsample the larger set (seeded, without replacement) so both have the same number of rows:
    the reference's balanced subset (which rows are drawn differs from ml-act's numpy RNG; the rule,
    a uniform equal-count subsample, is the same)."""
    n = min(len(src), len(tgt))
    g = torch.Generator().manual_seed(seed)
    if len(src) > n:
        src = src[torch.randperm(len(src), generator=g)[:n]]
    if len(tgt) > n:
        tgt = tgt[torch.randperm(len(tgt), generator=g)[:n]]
    return src, tgt


def _identity_where(mask: torch.Tensor, omega: torch.Tensor, beta: torch.Tensor):
    return torch.where(mask, torch.ones_like(omega), omega), torch.where(mask, torch.zeros_like(beta), beta)


def linear_act(
    src: torch.Tensor,
    tgt: torch.Tensor,
    *,
    seed: int = 0,
    fit_shift: bool = True,
    degenerate: Degenerate = "skip",
    sample: Sample = "balanced",
) -> tuple[AffineMap, FitInfo]:
    """Linear-AcT (Rodriguez et al., 2025; ml-act ``LinearOTHook`` + ``LinearProj.optimize``): per
    neuron, on an equal-count subsample, sort both samples, pair by rank, OLS in float64.

    ``ω = Σ(x−x̄)(y−ȳ) / Σ(x−x̄)²``, ``β = ȳ − ω·x̄``. ``degenerate="skip"`` (reference): a neuron
    whose source is constant is left untouched (ω = 1, β = 0); ``"shift"``: neurons with a source
    std below ``DEGENERATE_STD`` × scale get ω = 1 and a pure shift. ``fit_shift=False``: scale-only
    (least squares through the origin, ``ω = Σxy / Σx²``), for sites where no bias can take a shift.
    ``sample`` is accepted for a uniform signature: rank pairing always needs equal counts.
    """
    x, y = _check(src, tgt)
    x, y = equal_counts(x, y, seed)
    x, _ = torch.sort(x, dim=0)
    y, _ = torch.sort(y, dim=0)
    if fit_shift:
        mx, my = x.mean(0), y.mean(0)
        xc = x - mx
        var = (xc * xc).mean(0)
        cov = (xc * (y - my)).mean(0)
        if degenerate == "skip":
            bad = x[-1] == x[0]  # zero-width source support: ml-act's clamp moves nothing
        else:
            bad = var.sqrt() < DEGENERATE_STD * x.abs().mean(0).clamp_min(1.0)
        omega = torch.where(bad, torch.ones_like(var), cov / torch.where(bad, torch.ones_like(var), var))
        beta = my - omega * mx
        if degenerate == "skip":
            omega, beta = _identity_where(bad, omega, beta)
    else:
        sxx, sxy = (x * x).sum(0), (x * y).sum(0)
        if degenerate == "skip":
            bad = sxx == 0
        else:
            bad = sxx.sqrt() < DEGENERATE_STD * len(x) ** 0.5
        omega = torch.where(bad, torch.ones_like(sxx), sxy / torch.where(bad, torch.ones_like(sxx), sxx))
        beta = torch.zeros_like(omega)
    return AffineMap(omega.float(), beta.float()), FitInfo(len(src), len(tgt), int(bad.sum()))


def _moments(
    src: torch.Tensor, tgt: torch.Tensor, seed: int, sample: Sample, degenerate: Degenerate
) -> tuple[torch.Tensor, ...]:
    """(μ_s, σ_s, μ_t, σ_t, untouched) in float64; σ unbiased (torch.std), as ml-act's hooks."""
    x, y = _check(src, tgt)
    if sample == "balanced":
        x, y = equal_counts(x, y, seed)
    mx, sx, my, sy = x.mean(0), x.std(0), y.mean(0), y.std(0)
    if degenerate == "skip":
        # ml-act stores μ, σ in float32 and keeps neurons with σ_s > std_eps and σ_t > std_eps
        untouched = (sx.float() <= REFERENCE_STD_EPS) | (sy.float() <= REFERENCE_STD_EPS)
    else:
        untouched = torch.zeros_like(sx, dtype=torch.bool)
    return mx, sx, my, sy, untouched


def mean_act(
    src: torch.Tensor,
    tgt: torch.Tensor,
    *,
    seed: int = 0,
    fit_shift: bool = True,
    degenerate: Degenerate = "skip",
    sample: Sample = "balanced",
) -> tuple[AffineMap, FitInfo]:
    """Mean-AcT / ActAdd-style (ml-act ``OnlyMeanHook``): ω = 1, β = mean(target) − mean(source);
    ``degenerate="skip"`` leaves neurons with σ ≤ 1e-4 on either side untouched, ``"shift"`` moves all."""
    if not fit_shift:
        raise ActivationError("mean_act is a pure shift: it cannot be fitted with fit_shift: false.")
    mx, _, my, _, untouched = _moments(src, tgt, seed, sample, degenerate)
    beta = torch.where(untouched, torch.zeros_like(mx), my - mx)
    info = FitInfo(len(src), len(tgt), int(untouched.sum()))
    return AffineMap(torch.ones_like(beta).float(), beta.float()), info


def gaussian_act(
    src: torch.Tensor,
    tgt: torch.Tensor,
    *,
    seed: int = 0,
    fit_shift: bool = True,
    degenerate: Degenerate = "skip",
    sample: Sample = "balanced",
) -> tuple[AffineMap, FitInfo]:
    """Per-neuron Gaussian transport (ml-act ``GaussianOTHook``): ω = σ_t/σ_s, β = μ_t − ω μ_s.

    ``degenerate="skip"``: neurons with σ ≤ 1e-4 on either side are left untouched; ``"shift"``:
    neurons whose source σ is ~0 (relative to their scale) get ω = 1 and β = μ_t − μ_s."""
    mx, sx, my, sy, untouched = _moments(src, tgt, seed, sample, degenerate)
    if degenerate == "skip":
        bad = untouched
    else:
        x = src.double()
        bad = sx < DEGENERATE_STD * x.abs().mean(0).clamp_min(1.0)
    omega = torch.where(bad, torch.ones_like(sx), sy / torch.where(bad, torch.ones_like(sx), sx))
    beta = my - omega * mx if fit_shift else torch.zeros_like(omega)
    if degenerate == "skip":
        omega, beta = _identity_where(bad, omega, beta)
    return AffineMap(omega.float(), beta.float()), FitInfo(len(src), len(tgt), int(bad.sum()))


def keep_top(amap: AffineMap, src: torch.Tensor, fraction: float) -> AffineMap:
    """Sparsify a fitted map (actmerge's ``top_neurons``, not in the papers' Linear-AcT): keep the
    ``fraction`` of neurons the map moves most and make the rest identity (ω = 1, β = 0).

    A neuron's score is ``|log ω| + |β| / rms(source)``: the log-ratio of its scale (a neuron scaled
    by 2 or by 1/2 moves as much) plus its shift relative to the source activations it moves; for a
    scale-only map that is ``|log ω|``, for a shift-only map ``|β| / rms``. A non-positive ω (a sign
    flip) always ranks first. Ties at the cut are broken by index (``torch.topk``), so it is
    deterministic."""
    if not 0.0 < fraction <= 1.0:
        raise ActivationError(f"top_neurons must be in (0, 1], got {fraction}.")
    if fraction == 1.0:
        return amap
    omega, beta = amap.omega.double(), amap.beta.double()
    rms = src.double().pow(2).mean(0).sqrt()
    score = omega.abs().clamp_min(1e-300).log().abs() + beta.abs() / rms.clamp_min(1e-12)
    score = torch.where(omega > 0, score, torch.full_like(score, float("inf")))
    keep = torch.zeros_like(score, dtype=torch.bool)
    keep[score.topk(max(1, round(fraction * len(score)))).indices] = True
    return AffineMap(
        torch.where(keep, amap.omega, torch.ones_like(amap.omega)),
        torch.where(keep, amap.beta, torch.zeros_like(amap.beta)),
    )


ESTIMATORS: dict[str, Estimator] = {
    "linear_act": linear_act,
    "mean_act": mean_act,
    "gaussian_act": gaussian_act,
}
