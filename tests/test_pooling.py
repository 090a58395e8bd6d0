"""Pooling: the masked matrix product equals the plain float32 masked mean, in every dtype."""

import pytest
import torch

from actmerge.kinds.llm.hooks import Pooler, masked_sum


def _reference(a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.float().unsqueeze(-1)
    return (a.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


def _batch(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = (3 * torch.randn(5, 9, 24, generator=g)).to(dtype)
    mask = torch.ones(5, 9, dtype=torch.long)
    for i in range(5):
        mask[i, : 2 * i] = 0  # left padding of different lengths
    mask[4] = 0  # a row with nothing to pool: zeros, not NaN
    return a, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_mean_pooling_matches_float32_reference(dtype):
    a, mask = _batch(dtype)
    pooler = Pooler("mean")
    pooler.mask = mask
    got = pooler(a)
    assert got.dtype == torch.float32 and got.shape == (5, 24)
    ref = _reference(a, mask)
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-6)  # float32 accumulation in every dtype
    assert torch.all(got[4] == 0)


def test_new_mask_replaces_the_cached_one():
    a, mask = _batch(torch.float32)
    pooler = Pooler("mean")
    pooler.mask = mask
    pooler(a)
    other = torch.ones_like(mask)
    pooler.mask = other
    assert torch.allclose(pooler(a), a.mean(1), atol=1e-6)


def test_last_pooling_and_gradients():
    a, mask = _batch(torch.float32)
    pooler = Pooler("last")
    pooler.mask = mask
    assert torch.equal(pooler(a), a[:, -1, :])
    x = a.clone().requires_grad_(True)  # LinEAS back-propagates through the pooling
    mean = Pooler("mean")
    mean.mask = mask
    mean(x).sum().backward()
    assert torch.allclose(x.grad[0, :, 0], torch.full((9,), 1 / 9))
    assert torch.all(x.grad[1, :2] == 0)


def test_masked_sum_falls_back_where_no_float32_output_kernel():
    """The CUDA path (half-precision product with float32 output) probes its kernel; where it is missing
    (here: the CPU has none) the upcast gives the same float32 sums."""
    a, mask = _batch(torch.bfloat16)
    got = masked_sum(a, mask.to(torch.bfloat16).unsqueeze(1))
    assert got.dtype == torch.float32
    assert torch.allclose(got, (a.float() * mask.unsqueeze(-1)).sum(1), rtol=1e-6, atol=1e-5)
