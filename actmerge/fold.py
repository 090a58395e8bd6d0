"""Fold planning and the tensor math that bakes maps into weights (pure: no I/O, no model).

One engine for language models and diffusers pipelines. ``Edit`` is what one module's tensors
undergo (affine ops on its input and output side); ``compute`` is the only tensor math (float32,
cast back once, NaN/Inf refused); ``FoldPlan`` holds every edit of a bake plus, per map, where its
scale and shift went (``SitePlan``, data). ``plan()`` here places language-model sites (the
architecture table, ``sites.py``); ``diffusion/plan.py`` places pipeline sites into the same types.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

import torch

from .errors import MapsMismatchError, NotFoldableError
from .io.st_format import TensorInfo
from .io.st_rewrite import Streamed
from .io.weights import WeightEdits
from .shifts import capabilities, shift_home  # noqa: F401  (capabilities: library API)
from .sites import ALL, RUNTIMES

ShiftPolicy = Literal["error", "drop"]
SHIFT_POLICIES = ("error", "drop")


class Exactness(StrEnum):
    EXACT = "exact"
    EXACT_FLAGS = "exact+flags"
    SCALE_ONLY = "scale only (shift dropped)"
    IDENTITY = "identity"


@dataclass(frozen=True)
class FoldOptions:
    """How a fold may be planned, merged once from the recipe and the command line and handed to
    both fold-aware fitting and the planner.

    ``targets``: runtimes that must load every edit; ``shift_policy``: ``error`` refuses a shift
    that cannot fold, ``drop`` bakes its scale only; ``allow_config_change``: config flags (e.g.
    ``attention_bias``) may be set to add biases for shifts."""

    targets: frozenset[str] = frozenset()
    shift_policy: ShiftPolicy = "error"
    allow_config_change: bool = True

    def __post_init__(self):
        unknown = set(self.targets) - set(RUNTIMES)
        if unknown:
            raise NotFoldableError(
                f"unknown target runtime(s) {sorted(unknown)}; choose from {', '.join(RUNTIMES)}."
            )
        if self.shift_policy not in SHIFT_POLICIES:
            raise NotFoldableError(
                f"shift policy {self.shift_policy!r}: choose 'error' (refuse) or 'drop' (bake scales only)."
            )

    @classmethod
    def merged(
        cls,
        recipe: Any = None,
        *,
        targets: Iterable[str] = (),
        shift_policy: ShiftPolicy | None = None,
        allow_config_change: bool = True,
    ) -> FoldOptions:
        """Recipe and command line together: targets are the union, config changes need both to
        allow them, an explicit shift policy overrides the recipe's."""
        r_targets = frozenset(getattr(recipe, "targets", ()) or ())
        r_allow = bool(getattr(recipe, "allow_config_change", True))
        r_policy = getattr(getattr(recipe, "diffusion", None), "shift_policy", None)
        return cls(
            frozenset(targets) | r_targets,
            shift_policy or r_policy or "error",
            allow_config_change and r_allow,
        )


@dataclass
class SitePlan:
    """Where one map's scale and shift went (tensor names), as data."""

    key: str  # the maps key, <module>:<side>
    label: str  # site[layer], or component/site[block]
    exactness: Exactness
    scale_into: list[str] = field(default_factory=list)
    shift_into: list[str] = field(default_factory=list)
    flags: dict[str, Any] = field(default_factory=dict)
    runtimes: frozenset[str] = ALL
    note: str = ""
    site: Any = field(default=None, repr=False, compare=False)  # the resolved Site / DSite

    def to_dict(self) -> dict:
        return {
            "key": self.key,
            "label": self.label,
            "exactness": self.exactness.value,
            "scale_into": list(self.scale_into),
            "shift_into": list(self.shift_into),
            "flags": dict(self.flags),
            "runtimes": [r for r in RUNTIMES if r in self.runtimes],
            "note": self.note,
        }


Op = tuple[torch.Tensor | None, torch.Tensor | None]  # (scale, shift) of a ↦ scale·a + shift


@dataclass
class Edit:
    """New tensors of one module. ``kind``: ``norm`` (``x̂·γ`` or ``x̂·γ + β``), ``norm_1p`` (Gemma's
    ``x̂·(1+g)``), ``linear`` (``[out, in]`` weight; ``conv1d``: GPT-2's ``[in, out]``). ``inputs`` and
    ``outputs``: affine ops on that side, in forward order. ``new_bias``: the bias is not in the
    checkpoint (a config flag adds it) and starts at zero."""

    kind: Literal["norm", "norm_1p", "linear"]
    weight: str
    bias: str | None
    conv1d: bool = False
    new_bias: bool = False
    inputs: list[Op] = field(default_factory=list)
    outputs: list[Op] = field(default_factory=list)


def _compose(ops: list[Op], n: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Ops in forward order → one ``a ↦ s·a + c`` (None where every op leaves it alone)."""
    s, c = None, None
    for scale, shift in ops:
        if scale is not None:
            _dim(scale, n)
            s = scale.float() if s is None else scale.float() * s
            c = None if c is None else scale.float() * c
        if shift is not None:
            _dim(shift, n)
            c = shift.float() if c is None else c + shift.float()
    return s, c


def _dim(t: torch.Tensor, n: int) -> None:
    if t.numel() != n:
        raise MapsMismatchError(
            f"map of dim {t.numel()} does not fit a module of dim {n}: maps from another model?"
        )


def compute(e: Edit, read: Callable[[str], torch.Tensor], where: str = "") -> dict[str, torch.Tensor]:
    """The new tensors of one module (docs/design.md §4): float32 math, cast back to the checkpoint's
    dtype once, NaN/Inf refused. A weight whose ops are all shifts on its input side is only read
    (for ``b + W c``), never rewritten."""
    w0 = read(e.weight)
    dtype, w = w0.dtype, w0.float()
    out_dim = (w.shape[1] if e.conv1d else w.shape[0]) if e.kind == "linear" else w.shape[0]
    b = None
    if e.bias:
        b = torch.zeros(out_dim) if e.new_bias else read(e.bias).float()
    weight_changes = any(scale is not None for scale, _ in e.inputs + e.outputs)
    try:
        if e.kind == "linear":
            if e.conv1d:
                w = w.t()  # compute on [out, in]
            s, c = _compose(e.inputs, w.shape[1])
            if c is not None:  # W(s·a + c) + b = (W·diag(s))·a + (b + W c)
                b = (b if b is not None else torch.zeros(w.shape[0])) + torch.mv(w, c)
            if s is not None:
                w = w * s[None, :]
            s, c = _compose(e.outputs, w.shape[0])
            if s is not None:  # s(Wa + b) + c
                w = w * s[:, None]
                b = None if b is None else b * s
            if c is not None:
                b = (b if b is not None else torch.zeros(w.shape[0])) + c
            if e.conv1d:
                w = w.t().contiguous()
        else:
            s, c = _compose(e.outputs, w.shape[0])
            if e.kind == "norm_1p":  # x̂·(1+g) → (1+g') = s(1+g); untouched where s == 1
                w = w if s is None else torch.where(s == 1, w, s * (1.0 + w) - 1.0)
            else:  # x̂·γ + β → s(x̂·γ + β) + c
                w = w if s is None else w * s
                b = None if b is None or s is None else b * s
                if c is not None:
                    b = (b if b is not None else read(e.bias).float()) + c
    except MapsMismatchError as exc:
        raise MapsMismatchError(f"{where or e.weight}: {exc}") from None
    out = {e.weight: w.to(dtype)} if weight_changes else {}
    if e.bias:
        out[e.bias] = b.to(dtype)
    for name, t in out.items():
        if not _finite(t):
            raise NotFoldableError(
                f"folding into {name} produced NaN/Inf: the maps at {where or e.weight} are not finite or "
                f"overflow {dtype}. Refit, lower the strength, or bake in float32."
            )
    return out


CHUNK_ELEMENTS = 1 << 20  # elements per block handed to the writer
PIECE_ELEMENTS = 1 << 15  # elements computed at once: cache-sized, and at torch's grain size, so
# each op runs on one thread (two OpenMP threads on busy cores spend more time waiting than working)


def _pieces(rows: int, cols: int, start: int, stop: int) -> Iterable[tuple[int, int]]:
    step = max(1, PIECE_ELEMENTS // cols)
    for r0 in range(start, min(rows, stop), step):
        yield r0, min(rows, stop, r0 + step)


class Scratch:
    """One float32 buffer reused by the folds of one bake (grown on demand): a fresh multi-MB
    tensor per weight costs more in page faults than the arithmetic done in it."""

    def __init__(self):
        self.buf = torch.empty(0)

    def get(self, shape: torch.Size) -> torch.Tensor:
        n = shape.numel()
        if self.buf.numel() < n:
            self.buf = torch.empty(0)  # the old one is freed first
            self.buf = torch.empty(n)
        return self.buf[:n].view(shape)  # from the start: the allocator's 64-byte alignment


def compute_chunked(
    e: Edit,
    read: Callable[[str], torch.Tensor],
    where: str = "",
    chunk: int | None = None,
    scratch: Scratch | None = None,
) -> dict[str, torch.Tensor | Streamed]:
    """``compute`` for a linear weight of more than ``chunk`` elements (``CHUNK_ELEMENTS``): a
    rewritten weight is handed to the writer as row blocks (``Streamed``), each computed in
    cache-sized pieces (upcast, scale, NaN/Inf check, cast back) while the writer thread writes the
    previous block. Same formulas in the same order as ``compute``, so the same bytes (tested); the
    ``b + W c`` term of an input shift still multiplies the whole float32 weight, as ``compute``
    does (a row-blocked product may sum in another order), upcast into ``scratch`` (reused from one
    weight to the next) when one is given."""
    if e.kind != "linear":
        return compute(e, read, where)
    chunk = chunk or CHUNK_ELEMENTS
    w0 = read(e.weight)
    if w0.numel() <= chunk or w0.dim() != 2:
        return compute(e, lambda name: w0 if name == e.weight else read(name), where)
    weight_changes = any(scale is not None for scale, _ in e.inputs + e.outputs)
    dtype, (rows, cols) = w0.dtype, w0.shape
    out_dim, in_dim = (cols, rows) if e.conv1d else (rows, cols)
    b = None
    if e.bias:
        b = torch.zeros(out_dim) if e.new_bias else read(e.bias).float()
    try:
        s_in, c_in = _compose(e.inputs, in_dim)
        if c_in is not None:  # as in compute: b + W c on the whole float32 weight
            w = w0  # float32: w0 itself, as in compute (the product depends on alignment)
            if w0.dtype != torch.float32:  # else w0.float() in cache-sized single-threaded pieces
                w = scratch.get(w0.shape) if scratch else torch.empty(w0.shape)  # 64-byte aligned
                for r0, r1 in _pieces(rows, cols, 0, rows):
                    w[r0:r1].copy_(w0[r0:r1])
            b = (b if b is not None else torch.zeros(out_dim)) + torch.mv(w.t() if e.conv1d else w, c_in)
            del w
        s_out, c_out = _compose(e.outputs, out_dim)
        if s_out is not None:
            b = None if b is None else b * s_out
        if c_out is not None:
            b = (b if b is not None else torch.zeros(out_dim)) + c_out
    except MapsMismatchError as exc:
        raise MapsMismatchError(f"{where or e.weight}: {exc}") from None
    # per storage block [r0:r1]: the input scale first, then the output scale (compute's order)
    if e.conv1d:  # storage [in, out]
        scales = [(s_in, lambda s, r0, r1: s[r0:r1, None]), (s_out, lambda s, r0, r1: s[None, :])]
    else:
        scales = [(s_in, lambda s, r0, r1: s[None, :]), (s_out, lambda s, r0, r1: s[r0:r1, None])]
    scales = [(s, f) for s, f in scales if s is not None]
    step = max(1, chunk // cols)

    def blocks():
        for b0 in range(0, rows, step):
            out = torch.empty((min(rows, b0 + step) - b0, cols), dtype=dtype)
            for r0, r1 in _pieces(rows, cols, b0, b0 + step):
                x = w0[r0:r1].float()  # a view when the checkpoint is float32: scaled out of place
                for k, (s, f) in enumerate(scales):
                    x = x * f(s, r0, r1) if k == 0 and x.dtype == dtype else x.mul_(f(s, r0, r1))
                if not _cast_finite(x, dtype):  # the exact check (and its error) only when in doubt
                    _refuse_non_finite(x.to(dtype), e.weight, where, dtype)
                out[r0 - b0 : r1 - b0].copy_(x)  # the cast back, as .to(dtype)
            yield out

    out: dict[str, torch.Tensor | Streamed] = {}
    if weight_changes:
        out[e.weight] = Streamed(tuple(w0.shape), dtype, blocks)
    if e.bias:
        out[e.bias] = b.to(dtype)
        _refuse_non_finite(out[e.bias], e.bias, where or e.weight, dtype)
    return out


# the smallest float32 magnitude that rounds to ±inf when cast (round to nearest even)
_CAST_LIMIT = {torch.bfloat16: (2 - 2**-8) * 2**127, torch.float16: 65520.0}


def _cast_finite(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """True only if ``x`` (float32) has no NaN/Inf and none of it overflows when cast to ``dtype``:
    one min/max pass over the float32 block (a NaN fails both comparisons)."""
    lo, hi = torch.aminmax(x)
    lim = _CAST_LIMIT.get(dtype, math.inf)
    return -lim < float(lo) and float(hi) < lim


def _refuse_non_finite(t: torch.Tensor, name: str, where: str, dtype: torch.dtype) -> None:
    if not _finite(t):
        raise NotFoldableError(
            f"folding into {name} produced NaN/Inf: the maps at {where or name} are not finite or "
            f"overflow {dtype}. Refit, lower the strength, or bake in float32."
        )


@dataclass
class FoldPlan:
    """Every edit of one bake. ``edits`` are keyed by (component, module); a language model has the
    one component ``""``. ``new_tensors``: biases a config flag adds (name → (weight it sits beside,
    info))."""

    strength: float
    sites: list[SitePlan]
    edits: dict[tuple[str, str], Edit]
    config_patch: dict[str, Any] = field(default_factory=dict)
    new_tensors: dict[str, tuple[str, TensorInfo]] = field(default_factory=dict)
    targets: frozenset[str] = frozenset()

    @property
    def runtimes(self) -> frozenset[str]:
        out = ALL
        for s in self.sites:
            out &= s.runtimes
        return out

    @property
    def active(self) -> list[SitePlan]:
        return [s for s in self.sites if s.exactness is not Exactness.IDENTITY]

    def components(self) -> list[str]:
        return sorted({c for c, _ in self.edits})

    def edited_tensors(self, component: str = "") -> dict[str, str]:
        """tensor name → module, for every tensor of ``component`` the plan rewrites or adds."""
        out = {}
        for (c, module), e in self.edits.items():
            if c == component:
                out[e.weight] = module
                if e.bias:
                    out[e.bias] = module
        return out

    def weight_edits(self, component: str = "") -> WeightEdits:
        edits = {m: e for (c, m), e in self.edits.items() if c == component}
        where = f"{component}/" if component else ""
        scratch = Scratch()  # one float32 buffer for all of this weight set's b + W c products
        return WeightEdits(
            lambda module, read: compute_chunked(edits[module], read, where + module, scratch=scratch),
            self.edited_tensors(component),
            dict(self.new_tensors) if component == "" else {},
        )

    def rows(self) -> list[dict]:
        return [s.to_dict() for s in self.sites]


def _finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``: one float32 reduction (a non-finite element makes the sum non-finite; a
    finite tensor whose sum overflows gets the exact element-wise check)."""
    if bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


def nonzero(t: torch.Tensor) -> bool:
    return bool((t != 0).any())


def not_one(t: torch.Tensor) -> bool:
    return bool((t != 1).any())


def refuse_shifts(refused: list[str], where: str) -> NotFoldableError:
    return NotFoldableError(
        "these maps have shifts that cannot be folded exactly:\n" + "\n".join(refused) + "\nRemedies: "
        "`--shift-policy drop` bakes their scales only (actmerge reports the deviation); choose sites that "
        f"fold (see `actmerge sites {where}`); fit scale-only maps (`fit_shift: false` in the recipe); "
        "or drop a --target that cannot load the biases."
    )
