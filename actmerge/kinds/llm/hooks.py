"""Forward hooks as context managers that always clean up.

``attach`` is the one primitive: call ``fn(activation)`` on the input or output side of a module
(``fn`` may return a replacement). ``steer`` applies maps at a strength; ``record`` pools one
vector per sentence. The hook path is deliberately independent of the weight path (fold.py):
``verify`` compares the two.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch

from ...errors import ActivationError, MapsMismatchError
from ...maps import MapSet
from ..shared import ActFn, hook_module


def split_key(key: str) -> tuple[str, str]:
    module, _, side = key.rpartition(":")
    return module, side


@contextmanager
def attach(model: torch.nn.Module, key: str, fn: ActFn) -> Iterator[None]:
    """Run ``fn`` on the activation at ``key`` = ``<module>:<input|output>`` during forwards."""
    name, side = split_key(key)
    try:
        module = model.get_submodule(name)
    except AttributeError as exc:
        raise MapsMismatchError(f"the model has no module {name!r} (from {key!r}).") from exc
    with hook_module(module, side, fn, key):
        yield


def affine_fn(scale: torch.Tensor, shift: torch.Tensor) -> ActFn:
    """``a ↦ scale·a + shift`` computed in float32, cast back to the activation dtype."""
    cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def fn(a: torch.Tensor) -> torch.Tensor:
        if a.shape[-1] != scale.numel():
            raise MapsMismatchError(
                f"map of dim {scale.numel()} applied to an activation of dim {a.shape[-1]}."
            )
        k = (a.device,)
        if k not in cache:
            cache[k] = (scale.to(a.device, torch.float32), shift.to(a.device, torch.float32))
        s, c = cache[k]
        return (a.float() * s + c).to(a.dtype)

    return fn


def clamped_fn(scale: torch.Tensor, shift: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> ActFn:
    """ml-act's ``q_0_100`` variant: transport only values strictly inside the source support
    ``(lo, hi)``, leave the rest unchanged. Not affine, so it cannot be baked; evaluation only."""
    affine = affine_fn(scale, shift)
    cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def fn(a: torch.Tensor) -> torch.Tensor:
        k = (a.device,)
        if k not in cache:
            cache[k] = (lo.to(a.device, torch.float32), hi.to(a.device, torch.float32))
        low, high = cache[k]
        af = a.float()
        return torch.where((af > low) & (af < high), affine(a), a)

    return fn


@contextmanager
def steer(
    model: torch.nn.Module,
    maps: MapSet,
    strength: float = 1.0,
    support: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> Iterator[None]:
    """Apply every map at strength λ: ``a ↦ (1−λ+λω)·a + λβ``. With ``support`` (site → (min, max)
    of the source values), the clamped ml-act variant instead: only values inside it are moved."""
    with ExitStack() as stack:
        for key, m in maps.items():
            scale, shift = m.at(strength)
            fn = affine_fn(scale, shift)
            if support is not None and key in support:
                fn = clamped_fn(scale, shift, *support[key])
            stack.enter_context(attach(model, key, fn))
        yield


class Pooler:
    """Pools an activation ``[B, T, D]`` to ``[B, D]`` float32 with the current batch's token mask.

    ``mask`` ([B, T], 1 = real token) must be set before each forward. Left padding: the last real
    token is at position -1. Mean pooling is one masked matrix product per site, in the activation's
    own dtype where that keeps float32 accuracy: no masked temporary (nor, on a GPU, float32 copy) of
    the whole ``[B, T, D]`` activation, only the pooled ``[B, D]`` is float32. Differentiable (LinEAS).
    """

    def __init__(self, pooling: str = "mean"):
        self.pooling = pooling
        self._mask: torch.Tensor | None = None
        self._operands: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def mask(self) -> torch.Tensor | None:
        return self._mask

    @mask.setter
    def mask(self, mask: torch.Tensor) -> None:
        self._mask = mask
        self._operands.clear()  # per (device, dtype) copies of the new mask

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        if self.pooling == "last":
            return a[:, -1, :].float()
        weights, count = self._mask_for(a)
        return masked_sum(a, weights) / count

    def _mask_for(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mask as ``[B, 1, T]`` in the dtype ``masked_sum`` multiplies in, and the token counts
        ``[B, 1]`` (float32), both on ``a``'s device; cached per batch (sites may span devices)."""
        key = (a.device, a.dtype)
        if key not in self._operands:
            if self._mask is None:
                raise ActivationError("Pooler.mask must be set before the forward pass.")
            m = self._mask.to(a.device, torch.float32)
            self._operands[key] = (
                m.unsqueeze(1).to(_matmul_dtype(a)),
                m.sum(1, keepdim=True).clamp_min(1.0),
            )
        return self._operands[key]


def _matmul_dtype(a: torch.Tensor) -> torch.dtype:
    """float32/float64 and CUDA half precision multiply natively; CPU half precision in float32."""
    if a.dtype in (torch.float32, torch.float64) or (a.is_cuda and a.dtype in _HALF):
        return a.dtype
    return torch.float32


_HALF = (torch.float16, torch.bfloat16)


def masked_sum(a: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ_t weights[b, 0, t] · a[b, t, :]`` → ``[B, D]`` float32, accumulated in float32 at least.

    CUDA half precision: cuBLAS accumulates in float32 and writes float32 (``out_dtype``, PyTorch ≥ 2.8;
    where that kernel is missing, the upcast below). CPU half precision has no such kernel: the
    activation is upcast (exact float32 sums, one copy)."""
    if a.dtype in (torch.float32, torch.float64):
        return torch.bmm(weights, a).squeeze(1).float()
    if weights.dtype == a.dtype and _OUT_DTYPE_KERNEL.get(a.device.type, True):
        try:
            return torch.bmm(weights, a, out_dtype=torch.float32).squeeze(1)
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE_KERNEL[a.device.type] = False  # probe once per device type
    return torch.bmm(weights.float(), a.float()).squeeze(1)


_OUT_DTYPE_KERNEL: dict[str, bool] = {}


@contextmanager
def record(
    model: torch.nn.Module, keys: list[str], pooler: Pooler
) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Collect pooled activations ``{key: [[B, D] per batch]}`` (float32, on the activation's device).

    Nothing is copied to the CPU or checked inside the hooks (that would stall a GPU at every site):
    the caller drains the lists after each forward (``collect.collect`` does, checking for NaN/Inf)."""
    store: dict[str, list[torch.Tensor]] = {k: [] for k in keys}

    def make(key: str) -> ActFn:
        def fn(a: torch.Tensor) -> None:
            store[key].append(pooler(a))

        return fn

    with ExitStack() as stack:
        for key in keys:
            stack.enter_context(attach(model, key, make(key)))
        yield store
