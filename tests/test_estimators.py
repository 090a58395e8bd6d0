"""Estimators on synthetic data with a known answer."""

import pytest
import torch

from actmerge.errors import ActivationError
from actmerge.estimators import gaussian_act, linear_act, mean_act


def _gaussians(n=4000, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu, sigma = torch.randn(d, generator=g) * 3, torch.rand(d, generator=g) * 2 + 0.5
    a, b = torch.rand(d, generator=g) * 2 + 0.2, torch.randn(d, generator=g)
    x = mu + sigma * torch.randn(n, d, generator=g)
    y = a * (mu + sigma * torch.randn(n, d, generator=g)) + b  # independent sample of the transported law
    return x, y, a, b


def test_linear_act_recovers_known_affine_transport():
    x, y, a, b = _gaussians(n=20000)
    m, info = linear_act(x, y)
    assert torch.allclose(m.omega, a, rtol=0.03, atol=0)
    assert torch.allclose(m.beta, b, atol=0.15)
    assert info.degenerate == 0 and info.n_source == len(x)


def test_linear_act_is_exact_on_deterministic_pairs():
    x = torch.randn(500, 8, dtype=torch.float64)
    y = 1.7 * x - 0.3
    m, _ = linear_act(x, y)
    assert torch.allclose(m.omega, torch.full((8,), 1.7), atol=1e-5)
    assert torch.allclose(m.beta, torch.full((8,), -0.3), atol=1e-5)


def test_degenerate_neurons_fall_back_to_shift_and_are_counted():
    x, y, _, _ = _gaussians(n=200, d=4)
    x[:, 1] = 2.5  # constant source neuron: ω would explode
    ref, info = linear_act(x, y)  # reference: left untouched (ml-act's clamp moves nothing there)
    assert info.degenerate == 1 and ref.omega[1] == 1.0 and ref.beta[1] == 0.0
    m, info = linear_act(x, y, degenerate="shift")  # actmerge's variant: shift-only
    assert info.degenerate == 1
    assert m.omega[1] == 1.0
    assert torch.isclose(m.beta[1], y[:, 1].mean() - 2.5, atol=1e-4)
    assert torch.isfinite(m.omega).all()


def test_unequal_counts_subsampled():
    x, y, a, b = _gaussians(n=3000)
    m, _ = linear_act(x[:1000], y)
    assert torch.allclose(m.omega, a, atol=0.1)


def test_scale_only_fit():
    x = torch.rand(400, 6) + 1.0
    m, _ = linear_act(x, 0.6 * x, fit_shift=False)
    assert torch.all(m.beta == 0)
    assert torch.allclose(m.omega, torch.full((6,), 0.6), atol=1e-4)


def test_mean_and_gaussian_act():
    x, y, a, b = _gaussians()
    m, _ = mean_act(x, y)
    assert torch.all(m.omega == 1)
    assert torch.allclose(m.beta, y.mean(0) - x.mean(0), atol=1e-5)
    g, _ = gaussian_act(x, y)
    assert torch.allclose(g.omega, a, atol=0.06)


def test_bad_inputs():
    with pytest.raises(ActivationError, match="non-finite"):
        linear_act(torch.full((4, 2), float("nan")), torch.randn(4, 2))
    with pytest.raises(ActivationError, match="one D"):
        linear_act(torch.randn(4, 2), torch.randn(4, 3))
    with pytest.raises(ActivationError, match="at least 2"):
        linear_act(torch.randn(1, 2), torch.randn(4, 2))


def test_keep_top_hand_checked():
    """Scores |log ω| + |β|/rms(source): with rms = 2 for every neuron, the scores below are
    [log 2, log 2, 0.05, 0 + 1.5, log 1.1, inf (ω < 0)]; the top half keeps neurons 5, 3 and one of
    the log 2 pair (ties broken deterministically), the rest become identity."""
    from actmerge.estimators import keep_top
    from actmerge.maps import AffineMap

    omega = torch.tensor([2.0, 0.5, 1.0, 1.0, 1.1, -0.3])
    beta = torch.tensor([0.0, 0.0, 0.1, 3.0, 0.0, 0.2])
    src = torch.full((4, 6), 2.0)
    kept = keep_top(AffineMap(omega, beta), src, 0.5)
    moved = [i for i in range(6) if kept.omega[i] != 1 or kept.beta[i] != 0]
    assert 5 in moved and 3 in moved and len(moved) == 3 and len({0, 1} & set(moved)) == 1
    for i in moved:
        assert kept.omega[i] == omega[i] and kept.beta[i] == beta[i]
    assert kept.omega[2] == 1 and kept.beta[2] == 0 and kept.omega[4] == 1
    # scale-only maps rank by |log ω| alone: 1/4 and 4 tie above 1.5 and 0.9
    k = keep_top(AffineMap(torch.tensor([1.5, 0.25, 4.0, 0.9]), torch.zeros(4)), torch.ones(3, 4), 0.5)
    assert k.omega.tolist() == [1.0, 0.25, 4.0, 1.0]
    full = AffineMap(omega, beta)
    assert keep_top(full, src, 1.0) is full
    with pytest.raises(ActivationError, match="top_neurons"):
        keep_top(full, src, 0.0)
