"""Forward hooks as context managers that always clean up.

``attach`` is the one primitive: call ``fn(activation)`` on the input or output side of a module
(``fn`` may return a replacement). ``steer`` applies maps at a strength; ``record`` pools one
vector per sentence. The hook path is deliberately independent of the weight path (fold.py):
``verify`` compares the two.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch

from .errors import ActivationError, MapsMismatchError
from .maps import MapSet

ActFn = Callable[[torch.Tensor], torch.Tensor | None]


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

    if side == "input":

        def pre_hook(_mod, args, kwargs):
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)

        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    elif side == "output":

        def hook(_mod, _args, output):
            tensor = output[0] if isinstance(output, tuple) else output
            new = fn(tensor)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handle = module.register_forward_hook(hook)
    else:
        raise MapsMismatchError(f"{key!r}: side must be 'input' or 'output'.")
    try:
        yield
    finally:
        handle.remove()


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


@contextmanager
def steer(model: torch.nn.Module, maps: MapSet, strength: float = 1.0) -> Iterator[None]:
    """Apply every map at strength λ: ``a ↦ (1−λ+λω)·a + λβ``."""
    with ExitStack() as stack:
        for key, m in maps.items():
            scale, shift = m.at(strength)
            stack.enter_context(attach(model, key, affine_fn(scale, shift)))
        yield


class Pooler:
    """Pools an activation ``[B, T, D]`` to ``[B, D]`` with the current batch's token mask.

    ``mask`` ([B, T], 1 = real token) must be set before each forward. Left padding: the last real
    token is at position -1.
    """

    def __init__(self, pooling: str = "mean"):
        self.pooling = pooling
        self.mask: torch.Tensor | None = None

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        if self.pooling == "last":
            return a[:, -1, :].float()
        m = self.mask.to(a.device, torch.float32).unsqueeze(-1)
        return (a.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


@contextmanager
def record(
    model: torch.nn.Module, keys: list[str], pooler: Pooler
) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Collect pooled activations ``{key: [[B, D] per batch]}`` (on CPU, float32)."""
    store: dict[str, list[torch.Tensor]] = {k: [] for k in keys}

    def make(key: str) -> ActFn:
        def fn(a: torch.Tensor) -> None:
            pooled = pooler(a)
            if not torch.isfinite(pooled).all():
                raise ActivationError(
                    f"non-finite activations at {key}: the model produced NaN/Inf on these sentences "
                    "(try float32, shorter max_tokens, or check the checkpoint)."
                )
            store[key].append(pooled.cpu())

        return fn

    with ExitStack() as stack:
        for key in keys:
            stack.enter_context(attach(model, key, make(key)))
        yield store
