"""The names of a checkpoint's tensors as the planners see them: a module parameter name → the
tensor it is stored as (exact, or through an architecture's prefix aliases)."""

from __future__ import annotations

from collections.abc import Iterable

from .io.st_format import TensorInfo


class TensorNamer:
    """A module parameter name (``named_parameters()``) → the checkpoint's tensor name: exact, or
    through the row's prefix aliases, tried both ways (transformers 5 builds CLIPTextModel without
    ``text_model.``; older checkpoints name its tensors with it)."""

    def __init__(self, tensors: dict[str, TensorInfo], prefixes: Iterable[tuple[str, str]] = ()):
        self.tensors = tensors
        self.prefixes = tuple(prefixes)

    def __call__(self, name: str) -> str | None:
        if name in self.tensors:
            return name
        for a, b in self.prefixes:
            for src, dst in ((a, b), (b, a)):
                if name.startswith(src) and dst + name[len(src) :] in self.tensors:
                    return dst + name[len(src) :]
        return None
