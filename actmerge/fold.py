"""Fold planning and the tensor math that bakes maps into weights (pure: no I/O, no model).

``plan()`` turns maps at strength λ into a ``FoldPlan``: where each site's scale and shift go,
the config flags that must be set, the class of every site (exact / exact+flags / not foldable),
and the runtimes that load the result. ``FoldPlan.compute(module, read)`` produces the new tensors
of one module from its original tensors, in float32, cast back to the checkpoint's dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .errors import MapsMismatchError, NotFoldableError
from .maps import MapSet
from .sites import ALL, RUNTIMES, Architecture, Site, site_for_key

Exactness = Literal["exact", "exact+flags", "scale only (shift dropped)", "identity"]
ShiftPolicy = Literal["error", "drop"]


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string, e.g. "F32", "BF16"


@dataclass
class SitePlan:
    site: Site
    exactness: Exactness
    scale_into: list[str] = field(default_factory=list)
    shift_into: list[str] = field(default_factory=list)
    flags: dict[str, Any] = field(default_factory=dict)
    runtimes: frozenset[str] = ALL
    note: str = ""


@dataclass(frozen=True)
class _Op:
    """An affine map on one side of a module: ``a ↦ scale·a + shift`` (either may be None)."""

    side: str  # input | output
    scale: torch.Tensor | None
    shift: torch.Tensor | None


@dataclass
class _ModuleEdit:
    kind: str  # rmsnorm | rmsnorm_1p | layernorm | linear
    weight: str
    bias: str | None
    conv1d: bool = False
    ops: list[_Op] = field(default_factory=list)
    new_bias: bool = False


@dataclass
class FoldPlan:
    arch: Architecture
    strength: float
    sites: list[SitePlan]
    config_patch: dict[str, Any]
    edits: dict[str, _ModuleEdit]  # module path → edit
    new_tensors: dict[str, tuple[str, TensorInfo]]  # new bias name → (weight it sits beside, info)
    targets: frozenset[str]

    @property
    def runtimes(self) -> frozenset[str]:
        out = ALL
        for s in self.sites:
            out &= s.runtimes
        return out

    def edited_tensors(self) -> dict[str, str]:
        """checkpoint tensor name → module path, for every tensor the plan rewrites or adds."""
        out = {}
        for module, e in self.edits.items():
            out[e.weight] = module
            if e.bias:
                out[e.bias] = module
        return out

    def compute(self, module: str, read: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
        """New tensors of one module. ``read(name)`` returns an original checkpoint tensor."""
        e = self.edits[module]
        w0 = read(e.weight)
        dtype = w0.dtype
        w = w0.float()
        # a weight whose ops are all input-side shifts is only read (for b' = b + W c), never rewritten
        weight_changes = not (
            e.kind == "linear" and all(op.side == "input" and op.scale is None for op in e.ops)
        )
        b = None
        if e.bias:
            b = torch.zeros(w.shape[1] if e.conv1d else w.shape[0]) if e.new_bias else read(e.bias).float()
        if e.kind == "linear":
            if e.conv1d:
                w = w.t()  # Conv1D stores [in, out]; compute on [out, in]
            if b is None:
                b = torch.zeros(w.shape[0])
            for op in e.ops:
                if op.side == "input":
                    _dim(op, w.shape[1], module)
                    if op.shift is not None:
                        b = b + torch.mv(w, op.shift.float())  # b' = b + W c
                    if op.scale is not None:
                        w = w * op.scale[None, :]
                else:
                    _dim(op, w.shape[0], module)
                    if op.scale is not None:
                        w = w * op.scale[:, None]
                        b = b * op.scale
                    if op.shift is not None:
                        b = b + op.shift
            if e.conv1d:
                w = w.t().contiguous()
        else:
            (op,) = e.ops
            _dim(op, w.shape[0], module)
            s = op.scale if op.scale is not None else torch.ones_like(w)
            if e.kind == "rmsnorm":
                w = w * s
            elif e.kind == "rmsnorm_1p":  # Gemma: x̂·(1+g) → (1+g') = s(1+g); untouched where s == 1
                w = torch.where(s == 1, w, s * (1.0 + w) - 1.0)
            elif e.kind == "layernorm":
                w = w * s
                b = b * s
                if op.shift is not None:
                    b = b + op.shift
        out = {e.weight: w.to(dtype)} if weight_changes else {}
        if e.bias:
            out[e.bias] = b.to(dtype)
        for name, t in out.items():
            if not _finite(t):
                raise NotFoldableError(
                    f"folding into {name} produced NaN/Inf: the maps at {module} are not finite or overflow "
                    f"{dtype}. Refit, lower the strength, or bake in float32."
                )
        return out


def _finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``: one float32 reduction (a non-finite element makes the sum non-finite; a
    finite tensor whose sum overflows gets the exact element-wise check)."""
    if bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


def _dim(op: _Op, n: int, module: str) -> None:
    for t in (op.scale, op.shift):
        if t is not None and t.numel() != n:
            raise MapsMismatchError(
                f"map of dim {t.numel()} does not fit {module} (dim {n}): maps from another model?"
            )


def _nonzero(t: torch.Tensor) -> bool:
    return bool((t != 0).any())


def _not_one(t: torch.Tensor) -> bool:
    return bool((t != 1).any())


def _config_get(config: dict, dotted: str) -> Any:
    value: Any = config
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def plan(
    arch: Architecture,
    config: dict,
    maps: MapSet,
    strength: float,
    tensors: dict[str, TensorInfo],
    *,
    targets: frozenset[str] | set[str] = frozenset(),
    shift_policy: ShiftPolicy = "error",
    allow_flags: bool = True,
) -> FoldPlan:
    """Plan the fold of ``maps`` at ``strength`` into a checkpoint with tensors ``tensors``."""
    targets = frozenset(targets)
    unknown = targets - set(RUNTIMES)
    if unknown:
        raise NotFoldableError(
            f"unknown target runtime(s) {sorted(unknown)}; choose from {', '.join(RUNTIMES)}."
        )
    name_of = _tensor_namer(arch, tensors)
    edits: dict[str, _ModuleEdit] = {}
    site_plans: list[SitePlan] = []
    config_patch: dict[str, Any] = {}
    refused: list[str] = []

    def edit(module: str, kind: str, conv1d: bool = False, want_bias: bool = False) -> _ModuleEdit:
        if module not in edits:
            wname = name_of(f"{module}.weight", required=True)
            bname = name_of(f"{module}.bias")
            edits[module] = _ModuleEdit(kind, wname, bname, conv1d)
        e = edits[module]
        if want_bias and e.bias is None:
            e.bias = _bias_name(e.weight)
            e.new_bias = True
        return e

    for key, amap in maps.items():
        try:
            site = site_for_key(arch, config, key)
        except Exception as exc:
            raise MapsMismatchError(f"maps do not match this {arch.name} model: {exc}") from exc
        scale, shift = amap.at(strength)
        has_scale, has_shift = _not_one(scale), _nonzero(shift)
        rule = site.rule
        sp = SitePlan(site, "identity" if not (has_scale or has_shift) else "exact")
        site_plans.append(sp)
        if not (has_scale or has_shift):
            continue
        bias_roles = _bias_roles(rule)
        shift_ok, why, flags, runtimes = True, "", {}, ALL
        if has_shift:
            shift_ok, why, flags, runtimes = shift_home(
                arch, config, site.name, targets=targets, allow_flags=allow_flags
            )
        if has_shift and not shift_ok:
            if shift_policy == "error":
                refused.append(f"  {key} ({site.name}): {why}")
                continue
            shift, has_shift, flags, runtimes = torch.zeros_like(shift), False, {}, ALL
            sp.exactness, sp.note = "scale only (shift dropped)", why
            if not has_scale:
                continue
        sp.flags, sp.runtimes = flags, runtimes
        if flags:
            sp.exactness = "exact+flags"
            config_patch.update(flags)
        # scale and shift homes
        if rule.fold in ("rmsnorm", "rmsnorm_1p", "layernorm"):
            e = edit(site.module, rule.fold)
            e.ops.append(
                _Op(
                    "output",
                    scale if has_scale else None,
                    shift if (has_shift and rule.fold == "layernorm") else None,
                )
            )
            sp.scale_into = [e.weight] + ([e.bias] if rule.fold == "layernorm" and e.bias else [])
            if rule.fold == "layernorm" and has_shift:
                sp.shift_into = [e.bias]
            elif has_shift:
                for role in bias_roles:
                    lin = arch.linears[role]
                    ce = edit(arch.layer_module(site.layer, lin.module), "linear", lin.conv1d, want_bias=True)
                    ce.ops.append(_Op("input", None, shift))
                    sp.shift_into.append(ce.bias)
        else:
            lin = arch.linears[rule.linear]
            e = edit(site.module, "linear", lin.conv1d, want_bias=has_shift)
            side = "input" if rule.fold == "linear_in" else "output"
            e.ops.append(_Op(side, scale if has_scale else None, shift if has_shift else None))
            sp.scale_into = [e.weight] + ([e.bias] if side == "output" and e.bias and has_scale else [])
            if has_shift:
                sp.shift_into = [e.bias]
    if refused:
        raise NotFoldableError(
            "these maps have shifts that cannot be folded exactly:\n" + "\n".join(refused) + "\nRemedies: "
            "`--shift-policy drop` bakes their scales only (actmerge reports the deviation); choose sites that "
            "fold (see `actmerge sites MODEL`); fit scale-only maps (`fit_shift: false` in the recipe); "
            "or drop a --target that cannot load the biases."
        )
    for e in edits.values():  # input-side ops before output-side ops: forward order within a module
        e.ops.sort(key=lambda op: op.side != "input")
    new_tensors = _companion_biases(arch, config, config_patch, edits, tensors, name_of)
    _guard_tied(arch, config, edits)
    return FoldPlan(arch, strength, site_plans, config_patch, edits, new_tensors, targets)


def _bias_roles(rule) -> list[str]:
    if rule.fold in ("rmsnorm", "rmsnorm_1p"):
        return list(rule.consumers)
    return [rule.linear] if rule.linear else []


def shift_home(
    arch: Architecture,
    config: dict,
    site_name: str,
    *,
    targets: frozenset[str] = frozenset(),
    allow_flags: bool = True,
) -> tuple[bool, str, dict[str, Any], frozenset[str]]:
    """Can a shift at this site fold? → (ok, why not, config flags needed, runtimes that load it)."""
    rule = arch.sites[site_name]
    if rule.fold == "layernorm":
        return True, "", {}, ALL
    roles = _bias_roles(rule)
    if not roles:
        return (
            False,
            f"{rule.module} is a norm whose output adds straight into the residual: no bias can take a shift",
            {},
            ALL,
        )
    flags: dict[str, Any] = {}
    runtimes = ALL
    for role in roles:
        lin = arch.linears[role]
        runtimes &= lin.runtimes
        if lin.bias == "never":
            return False, f"{lin.module} has no bias in {arch.name} and no config flag adds one", {}, ALL
        if lin.bias != "always" and not _config_get(config, lin.bias):
            if not allow_flags:
                return (
                    False,
                    f"{lin.module} needs config flag {lin.bias}=true (config changes disallowed)",
                    {},
                    ALL,
                )
            flags[lin.bias] = True
    if targets - runtimes:
        return False, f"the added bias is not loaded by {', '.join(sorted(targets - runtimes))}", {}, ALL
    return True, "", flags, runtimes


def capabilities(
    arch: Architecture, config: dict, targets: frozenset[str] = frozenset()
) -> list[dict[str, str]]:
    """Per site: where a scale and a shift fold for this config (for `actmerge sites MODEL`)."""
    rows = []
    for name, rule in arch.sites.items():
        ok, why, flags, runtimes = shift_home(arch, config, name, targets=targets)
        cls = ("exact+flags" if flags else "exact") if ok else "not foldable"
        rows.append(
            {
                "site": name,
                "module": f"{arch.layers.format(i='{i}')}.{rule.module}",
                "side": rule.side,
                "fold": rule.fold,
                "scale": "exact",
                "shift": cls + (f" ({', '.join(f'{k}=true' for k in flags)})" if flags else ""),
                "runtimes (shift)": ", ".join(r for r in RUNTIMES if r in runtimes) if ok else "-",
                "why": why,
                "about": rule.about,
            }
        )
    return rows


def _bias_name(weight: str) -> str:
    return weight[: -len("weight")] + "bias"


def _tensor_namer(arch: Architecture, tensors: dict[str, TensorInfo]):
    """Map a ``named_parameters()`` name to the checkpoint's tensor name (prefix aliases)."""

    def name_of(param: str, required: bool = False) -> str | None:
        if param in tensors:
            return param
        for ours, theirs in arch.tensor_prefixes:
            if param.startswith(ours) and theirs + param[len(ours) :] in tensors:
                return theirs + param[len(ours) :]
        if required:
            raise MapsMismatchError(f"tensor {param} is not in the checkpoint: maps from another model?")
        return None

    return name_of


def _companion_biases(arch, config, patch, edits, tensors, name_of) -> dict[str, tuple[str, TensorInfo]]:
    """Every bias that a newly set flag makes the model expect: edited ones, and zeros elsewhere."""
    out: dict[str, tuple[str, TensorInfo]] = {}
    from .sites import num_layers

    for layer in range(num_layers(arch, config)):
        for lin in arch.linears.values():
            if lin.bias not in patch:
                continue
            wname = name_of(f"{arch.layer_module(layer, lin.module)}.weight", required=True)
            bname = _bias_name(wname)
            if bname in tensors:
                continue
            info = tensors[wname]
            out[bname] = (wname, TensorInfo((info.shape[-1] if lin.conv1d else info.shape[0],), info.dtype))
    for e in edits.values():
        if e.new_bias and e.bias not in out:
            info = tensors[e.weight]
            out[e.bias] = (e.weight, TensorInfo((info.shape[-1] if e.conv1d else info.shape[0],), info.dtype))
    return out


def _guard_tied(arch: Architecture, config: dict, edits: dict[str, _ModuleEdit]) -> None:
    if not (
        _config_get(config, "tie_word_embeddings") or _config_get(config, "text_config.tie_word_embeddings")
    ):
        return
    touched = {n for e in edits.values() for n in (e.weight, e.bias) if n}
    for a, b in arch.tied:
        if a in touched or b in touched:
            raise NotFoldableError(
                f"the plan edits {a if a in touched else b}, which is tied to {b if a in touched else a} "
                "(tie_word_embeddings): actmerge never edits a tied tensor silently. Untie the checkpoint "
                "first (save separate tensors and set tie_word_embeddings=false) or choose another site."
            )


def describe(p: FoldPlan) -> list[dict[str, str]]:
    """Rows for the dry-run table and the model card."""
    rows = []
    for sp in p.sites:
        rows.append(
            {
                "site": f"{sp.site.name}[{sp.site.layer}]",
                "key": sp.site.key,
                "class": sp.exactness,
                "scale →": ", ".join(_short(n) for n in sp.scale_into) or "-",
                "shift →": ", ".join(_short(n) for n in sp.shift_into) or "-",
                "config": ", ".join(f"{k}={v}" for k, v in sp.flags.items()) or "-",
                "runtimes": ", ".join(r for r in RUNTIMES if r in sp.runtimes),
                "note": sp.note,
            }
        )
    return rows


def _short(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[-3:]) if len(parts) > 3 else name
