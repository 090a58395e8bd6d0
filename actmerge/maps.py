"""Affine transport maps and the maps file (a contract with other tools, see docs/formats.md).

A map ``T(a) = ω·a + β`` acts per neuron on one side of one module. At strength λ the model sees
``(1 − λ + λω)·a + λβ``: an affine map with scale ``s`` and shift ``c`` (``AffineMap.at``).

Maps file: safetensors with, per transformed activation, two float32 1-D tensors
``<module>:<input|output>:omega`` and ``<module>:<input|output>:beta``; metadata holds
``format`` (``actmerge-maps/1``), ``base_model``, ``method``, ``recipe_hash`` and free-form extras.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import MapsMismatchError

FORMAT = "actmerge-maps/1"


@dataclass(frozen=True)
class AffineMap:
    """Per-neuron ``T(a) = omega·a + beta`` (float32, 1-D, same length)."""

    omega: torch.Tensor
    beta: torch.Tensor

    def __post_init__(self):
        if self.omega.shape != self.beta.shape or self.omega.dim() != 1:
            raise MapsMismatchError(
                f"omega {tuple(self.omega.shape)} and beta {tuple(self.beta.shape)} must be 1-D of one length."
            )

    @property
    def dim(self) -> int:
        return self.omega.numel()

    @classmethod
    def identity(cls, dim: int) -> AffineMap:
        return cls(torch.ones(dim), torch.zeros(dim))

    def at(self, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) of the interpolated map at strength λ, in float32.

        λ = 0 gives exactly (1, 0); callers rely on that for bit-identical λ = 0 bakes.
        """
        lam = float(strength)
        if lam == 0.0:
            return torch.ones_like(self.omega, dtype=torch.float32), torch.zeros_like(
                self.beta, dtype=torch.float32
            )
        omega, beta = self.omega.float(), self.beta.float()
        return (1.0 - lam) + lam * omega, lam * beta

    def then(self, other: AffineMap) -> AffineMap:
        """``other ∘ self``: apply self first. Composition of affine maps is affine."""
        return AffineMap(other.omega * self.omega, other.omega * self.beta + other.beta)

    def scale_only(self) -> AffineMap:
        return AffineMap(self.omega, torch.zeros_like(self.beta))

    def interpolated(self, strength: float) -> AffineMap:
        """The map a model sees at strength λ, as a map applied at strength 1."""
        s, c = self.at(strength)
        return AffineMap(s, c)


@dataclass
class MapSet:
    """Maps keyed by ``<module>:<input|output>``, in forward order, plus file metadata."""

    maps: dict[str, AffineMap]
    base_model: str = ""
    method: str = ""
    recipe_hash: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.maps)

    def items(self):
        return self.maps.items()

    def to_bytes(self) -> bytes:
        """The maps file's bytes (what ``save`` writes)."""
        from safetensors.torch import save

        return save(*self._tensors_and_meta())

    def save(self, path: str | Path, *, force: bool = True, source=None) -> Path:
        """Write the maps file atomically (temp file beside it, then rename). ``force`` replaces only a
        maps file (its ``format`` metadata marks it); ``source``: paths it must not touch."""
        from .io.output import atomic_file

        path = Path(path)
        with atomic_file(path, force=force, source=source) as tmp:
            tmp.write_bytes(self.to_bytes())
        return path

    def _tensors_and_meta(self) -> tuple[dict, dict]:
        tensors = {}
        for key, m in self.maps.items():
            tensors[f"{key}:omega"] = m.omega.detach().float().contiguous().cpu()
            tensors[f"{key}:beta"] = m.beta.detach().float().contiguous().cpu()
        meta = {
            "format": FORMAT,
            "base_model": self.base_model,
            "method": self.method,
            "recipe_hash": self.recipe_hash,
            "order": json.dumps(list(self.maps)),
        }
        meta.update({k: str(v) for k, v in self.extra.items()})
        return tensors, meta

    @classmethod
    def load(cls, path: str | Path) -> MapSet:
        path = Path(path)
        if not path.is_file():
            raise MapsMismatchError(f"maps file {path} does not exist (create one with `actmerge fit`).")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                names = list(f.keys())
                tensors = {n: f.get_tensor(n) for n in names}
        except Exception as exc:  # safetensors raises its own error types
            raise MapsMismatchError(f"{path} is not a readable safetensors maps file: {exc}") from exc
        if meta.get("format") != FORMAT:
            raise MapsMismatchError(
                f"{path}: metadata format is {meta.get('format')!r}, expected {FORMAT!r}."
            )
        keys = [n[: -len(":omega")] for n in names if n.endswith(":omega")]
        try:
            order = json.loads(meta["order"]) if "order" in meta else keys
            if not isinstance(order, list) or not all(isinstance(k, str) for k in order):
                raise ValueError("not a list of keys")
        except ValueError as exc:
            raise MapsMismatchError(
                f"{path}: the 'order' metadata is malformed ({exc}); re-create the file with `actmerge fit`."
            ) from None
        order = [k for k in order if k in keys] + [k for k in keys if k not in order]
        maps = {}
        for key in order:
            if f"{key}:beta" not in tensors:
                raise MapsMismatchError(f"{path}: {key}:omega has no matching {key}:beta.")
            maps[key] = AffineMap(tensors[f"{key}:omega"].float(), tensors[f"{key}:beta"].float())
        extra = {
            k: v
            for k, v in meta.items()
            if k not in ("format", "base_model", "method", "recipe_hash", "order")
        }
        mapset = cls(
            maps, meta.get("base_model", ""), meta.get("method", ""), meta.get("recipe_hash", ""), extra
        )
        mapset.check_finite(str(path))
        return mapset

    def check_finite(self, where: str = "") -> None:
        """Refuse maps holding NaN or Inf (a damaged file: they would bake or steer to garbage)."""
        for key, m in self.maps.items():
            if not (bool(m.omega.isfinite().all()) and bool(m.beta.isfinite().all())):
                raise MapsMismatchError(
                    f"{where or 'the maps'}: the map at {key} holds NaN/Inf values. Re-create the maps "
                    "with `actmerge fit` (or `actmerge compose`)."
                )

    def interpolated(self, strength: float) -> MapSet:
        """Maps as seen at strength λ (so that applying them at strength 1 equals this set at λ)."""
        return MapSet(
            {k: m.interpolated(strength) for k, m in self.maps.items()},
            self.base_model,
            self.method,
            self.recipe_hash,
            dict(self.extra),
        )


def compose(first: MapSet, second: MapSet, strengths: tuple[float, float] = (1.0, 1.0)) -> MapSet:
    """Apply ``first`` at strengths[0], then ``second`` at strengths[1]; result is at strength 1."""
    for key, m in second.items():
        if key in first.maps and first.maps[key].dim != m.dim:
            names = (
                " and ".join(repr(b) for b in (first.base_model, second.base_model) if b) or "unnamed models"
            )
            raise MapsMismatchError(
                f"cannot compose: the maps at {key} have dims {first.maps[key].dim} and {m.dim}, so the files "
                f"were fitted on different models ({names}). Compose maps fitted on one model."
            )
    out = dict(first.interpolated(strengths[0]).maps)
    for key, m in second.interpolated(strengths[1]).items():
        out[key] = out[key].then(m) if key in out else m
    return MapSet(
        out,
        first.base_model or second.base_model,
        f"{first.method}+{second.method}",
        f"{first.recipe_hash}+{second.recipe_hash}",
    )
