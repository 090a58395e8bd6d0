"""The pieces of one LinEAS step (``lineas.fit_lineas`` runs them): the distributional loss — per-neuron
squared 1-D Wasserstein distances of sorted samples (``w2_per_neuron``, ``quantiles``, ``StepLoss``) —,
the proximal sparsity step after each Adam step (``soft_threshold``, ``group_shrink``, ``prox_``, as
ml-lineas' ``apply_sparse_group_lasso``) and the affine map whose parameter gradients are summed in
float64 (``WideAffine``: the same sum however data-parallel ranks split the rows)."""

from __future__ import annotations

import math

import torch


def w2_per_neuron(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared 1-D Wasserstein distance per column between samples ``x`` [n, d] and ``y`` [m, d].

    Sorted samples; when n ≠ m, ``y``'s quantiles are linearly interpolated at x's levels."""
    xs, _ = torch.sort(x, dim=0)
    ys, _ = torch.sort(y, dim=0)
    return ((xs - quantiles(ys, xs.shape[0])) ** 2).mean(0)


def quantiles(ys: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` quantiles per column of the sorted sample ``ys`` [m, d] (``ys`` itself when n = m)."""
    m = ys.shape[0]
    if n == m:
        return ys
    pos = (torch.arange(n, dtype=torch.float64, device=ys.device) + 0.5) / n * m - 0.5
    pos = pos.clamp(0, m - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=m - 1)
    w = (pos - lo).to(ys.dtype).unsqueeze(1)
    return ys[lo] * (1 - w) + ys[hi] * w


def soft_threshold(v: torch.Tensor, t: float) -> torch.Tensor:
    return torch.sign(v) * (v.abs() - t).clamp_min(0)


def group_shrink(v: torch.Tensor, thr: float) -> torch.Tensor:
    """Group-L2 proximal step: ``v·max(0, 1 − thr/‖v‖)`` (0 when ‖v‖ = 0)."""
    norm = float(v.norm())
    return v * (0.0 if norm <= thr else 1 - thr / norm)


def prox_(
    omega: torch.Tensor,
    beta: torch.Tensor,
    *,
    l1: float,
    group: float,
    lr: float,
    beta_trainable: bool,
    identity: float = 1.0,
    group_mode: str = "separate",
) -> None:
    """Proximal step in place: L1 soft-threshold on (ω−1) and β; then group-L2 shrink, threshold
    ``lr·group·√d``, of ``ω−1`` and of ``β`` as two groups (``"separate"``, ml-lineas) or of
    ``[ω−1, β]`` as one (``"joint"``). A frozen β stays 0 under either.

    ``identity`` is the value of the scale parameter at the identity map (1 for ω, 0 for log ω)."""
    with torch.no_grad():
        if l1 > 0:
            omega.copy_(identity + soft_threshold(omega - identity, lr * l1))
            if beta_trainable:
                beta.copy_(soft_threshold(beta, lr * l1))
        if group > 0:
            thr = lr * group * math.sqrt(omega.numel())
            if group_mode == "joint":
                v = group_shrink(torch.cat([omega - identity, beta]), thr)
                omega.copy_(identity + v[: omega.numel()])
                beta.copy_(v[omega.numel() :])
            elif group_mode == "separate":
                omega.copy_(identity + group_shrink(omega - identity, thr))
                beta.copy_(group_shrink(beta, thr))
            else:
                raise ValueError(f"unknown group_mode {group_mode!r}: use 'separate' or 'joint'")


class StepLoss:
    """The LinEAS loss of one step: per-neuron W2 (÷ the target's variance with ``target_var``)
    averaged over each site's neurons, then over sites — computed as one sort and one weighted sum
    over all sites' neurons side by side. Target statistics are prepared once (sorted once when
    every step uses the whole target sample)."""

    def __init__(
        self, tgt: dict[str, torch.Tensor], keys: list[str], loss_norm: str, n_source: int, fixed: bool
    ):
        self.target = torch.cat([tgt[k].float() for k in keys], 1)  # [M, ΣD]
        weights = []
        for k in keys:
            v = tgt[k]
            w = torch.full((v.shape[1],), 1.0 / (v.shape[1] * len(keys)), device=v.device)
            weights.append(w / (v.var(0) + 1e-6) if loss_norm in ("target_var", "target_std") else w)
        self.weight = torch.cat(weights)
        self.n_source = n_source
        self.sorted = quantiles(torch.sort(self.target, dim=0).values, n_source) if fixed else None

    def __call__(self, pooled: torch.Tensor, idx: list[int]) -> torch.Tensor:
        xs, _ = torch.sort(pooled.float(), dim=0)
        ys = self.sorted
        if ys is None:
            sample = self.target.index_select(0, torch.tensor(idx, device=self.target.device))
            ys = quantiles(torch.sort(sample, dim=0).values, self.n_source)
        return (((xs - ys) ** 2).mean(0) * self.weight).sum()


class WideAffine(torch.autograd.Function):
    """``a·ω + β`` computed in float32 (returned in ``a``'s dtype), whose parameter gradients are summed
    over the batch and token rows in ``ω``'s dtype (float64): exact products, a sum whose rounding does
    not depend on how the rows were split between processes."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
        s = scale.float()
        out = a.float() * s
        if shift is not None:
            out = out + shift.float()
        ctx.save_for_backward(a, s)
        ctx.wide, ctx.shifted = scale.dtype, shift is not None
        return out.to(a.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        a, s = ctx.saved_tensors
        rows = g.reshape(-1, g.shape[-1]).to(ctx.wide)
        grad_a = (g.float() * s).to(a.dtype)
        grad_scale = (rows * a.reshape(-1, a.shape[-1]).to(ctx.wide)).sum(0)
        return grad_a, grad_scale, rows.sum(0) if ctx.shifted else None
