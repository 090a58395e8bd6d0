"""Estimators: pure functions ``(source [N, D], target [M, D]) → (AffineMap, FitInfo)``.

All arithmetic in float64; maps are returned in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import ActivationError
from .maps import AffineMap

# source std below this (relative to the neuron's scale) makes ω = cov/var explode
DEGENERATE_STD = 1e-6


@dataclass(frozen=True)
class FitInfo:
    n_source: int
    n_target: int
    degenerate: int = 0  # neurons that fell back to a shift-only map


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
    """Subsample the larger set (seeded) so both have the same number of rows."""
    n = min(len(src), len(tgt))
    g = torch.Generator().manual_seed(seed)
    if len(src) > n:
        src = src[torch.randperm(len(src), generator=g)[:n]]
    if len(tgt) > n:
        tgt = tgt[torch.randperm(len(tgt), generator=g)[:n]]
    return src, tgt


def linear_act(
    src: torch.Tensor, tgt: torch.Tensor, *, seed: int = 0, fit_shift: bool = True
) -> tuple[AffineMap, FitInfo]:
    """Linear-AcT (Rodriguez et al., 2025): per neuron, sort both samples, pair by rank, OLS.

    ``ω = cov(x_sorted, y_sorted) / var(x_sorted)``, ``β = mean(y) − ω·mean(x)``. Neurons whose
    source std is ~0 get ω = 1 and a pure shift. With ``fit_shift=False`` the fit is scale-only
    (least squares through the origin, ``ω = Σxy / Σx²``), for sites where no bias can take a shift.
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
        scale = x.abs().mean(0).clamp_min(1.0)
        degenerate = var.sqrt() < DEGENERATE_STD * scale
        omega = torch.where(
            degenerate, torch.ones_like(var), cov / torch.where(degenerate, torch.ones_like(var), var)
        )
        beta = my - omega * mx
    else:
        sxx, sxy = (x * x).sum(0), (x * y).sum(0)
        degenerate = sxx.sqrt() < DEGENERATE_STD * len(x) ** 0.5
        omega = torch.where(
            degenerate, torch.ones_like(sxx), sxy / torch.where(degenerate, torch.ones_like(sxx), sxx)
        )
        beta = torch.zeros_like(omega)
    return AffineMap(omega.float(), beta.float()), FitInfo(len(src), len(tgt), int(degenerate.sum()))


def mean_act(
    src: torch.Tensor, tgt: torch.Tensor, *, seed: int = 0, fit_shift: bool = True
) -> tuple[AffineMap, FitInfo]:
    """Mean-AcT / ActAdd-style: ω = 1, β = mean(target) − mean(source)."""
    x, y = _check(src, tgt)
    beta = y.mean(0) - x.mean(0)
    if not fit_shift:
        raise ActivationError("mean_act is a pure shift: it cannot be fitted with fit_shift: false.")
    return AffineMap(torch.ones_like(beta).float(), beta.float()), FitInfo(len(src), len(tgt))


def gaussian_act(
    src: torch.Tensor, tgt: torch.Tensor, *, seed: int = 0, fit_shift: bool = True
) -> tuple[AffineMap, FitInfo]:
    """Per-neuron Gaussian transport: ω = σ_t/σ_s, β = μ_t − ω μ_s."""
    x, y = _check(src, tgt)
    sx, sy = x.std(0), y.std(0)
    degenerate = sx < DEGENERATE_STD * x.abs().mean(0).clamp_min(1.0)
    omega = torch.where(
        degenerate, torch.ones_like(sx), sy / torch.where(degenerate, torch.ones_like(sx), sx)
    )
    beta = y.mean(0) - omega * x.mean(0) if fit_shift else torch.zeros_like(omega)
    return AffineMap(omega.float(), beta.float()), FitInfo(len(src), len(tgt), int(degenerate.sum()))


ESTIMATORS: dict[str, Estimator] = {
    "linear_act": linear_act,
    "mean_act": mean_act,
    "gaussian_act": gaussian_act,
}
