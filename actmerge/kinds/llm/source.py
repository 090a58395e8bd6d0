"""A language model argument resolved (``models.resolve``) and loaded lazily."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...models import ModelSource, load_model, resolve
from ...placement import Placement


@dataclass
class Loaded:
    """A resolved language model with its (lazily) loaded transformers model and tokenizer."""

    source: ModelSource
    placement: Placement = field(default_factory=Placement)
    _model: object = None
    _tok: object = None

    def __post_init__(self):
        if not isinstance(self.placement, Placement):  # a device name, e.g. Loaded(source, "cpu")
            self.placement = Placement(self.placement)

    def get(self):
        if self._model is None:
            self._model, self._tok = load_model(self.source, placement=self.placement)
        return self._model, self._tok

    def release(self) -> None:
        """Drop the loaded model (``get`` loads it again): frees its memory once no one else holds it."""
        self._model = self._tok = None


def load(
    model: str | Loaded, *, revision: str | None = None, placement: Placement | None = None, log=print
) -> Loaded:
    """A model argument as a lazily loaded model (a ``Loaded`` passes through)."""
    if isinstance(model, Loaded):
        return model
    return Loaded(resolve(model, revision, log=log), placement or Placement())
