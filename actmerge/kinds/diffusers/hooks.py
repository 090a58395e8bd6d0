"""Hooks on pipeline components, as context managers that always clean up.

The hook path applies a map to the activation itself, independently of the weight path (plan.py):
``verify`` compares the two. Activations are ``[B, T, D]`` (tokens) or ``[B, C, H, W]`` (feature
maps, NCHW as in diffusers): a map acts on the last axis, or on the channel axis of a 4-D map.
An input-side hook replaces the first positional argument or the ``hidden_states`` keyword (SD3
and FLUX call their attention modules with keywords); an output-side hook replaces a tensor output
or the first element of a tuple (AdaLayerNormZero returns the normalised input first).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager

import torch

from ...errors import MapsMismatchError
from ...maps import MapSet
from ..shared import hook_module
from .sites import split_key

ActFn = Callable[[torch.Tensor], torch.Tensor | None]


def channel_axis(a: torch.Tensor) -> int:
    return 1 if a.dim() == 4 else -1


def module_at(components: Mapping[str, torch.nn.Module], key: str) -> tuple[torch.nn.Module, str]:
    component, module, side = split_key(key)
    if component not in components or components[component] is None:
        raise MapsMismatchError(f"{key!r}: the pipeline has no component {component!r}.")
    try:
        return components[component].get_submodule(module), side
    except AttributeError as exc:
        raise MapsMismatchError(f"{key!r}: {component} has no module {module!r}.") from exc


@contextmanager
def attach(components: Mapping[str, torch.nn.Module], key: str, fn: ActFn) -> Iterator[None]:
    module, side = module_at(components, key)
    with hook_module(module, side, fn, key):
        yield


def affine_fn(scale: torch.Tensor, shift: torch.Tensor, key: str) -> ActFn:
    """``a ↦ scale·a + shift`` along the channel axis, in float32, cast back to the activation dtype."""

    def fn(a: torch.Tensor) -> torch.Tensor:
        axis = channel_axis(a)
        if a.shape[axis] != scale.numel():
            raise MapsMismatchError(
                f"{key}: map of dim {scale.numel()} applied to an activation of shape {tuple(a.shape)} "
                f"(channel axis {axis})."
            )
        shape = [1] * a.dim()
        shape[axis] = -1
        s = scale.to(a.device, torch.float32).view(shape)
        c = shift.to(a.device, torch.float32).view(shape)
        return (a.float() * s + c).to(a.dtype)

    return fn


@contextmanager
def steer(components: Mapping[str, torch.nn.Module], maps: MapSet, strength: float = 1.0) -> Iterator[None]:
    """Apply every map at strength λ, at every call (every denoising step)."""
    with ExitStack() as stack:
        for key, m in maps.items():
            scale, shift = m.at(strength)
            stack.enter_context(attach(components, key, affine_fn(scale, shift, key)))
        yield
