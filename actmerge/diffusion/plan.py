"""Fold planning for pipelines and the tensor math (pure: no I/O, no model). Rules: table.py.

``plan()`` turns maps at strength λ into a ``PipelinePlan``: per component, the modules whose
tensors change and the affine ops to fold into each; per site, where its scale and shift went.
Several ops on one side of one linear (a T5 shift routed into caption_projection.linear_1 plus a
map at that layer's input) are composed in forward order before folding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..errors import MapsMismatchError, NotFoldableError
from ..maps import MapSet
from .sites import DSite, site_for_key
from .source import PipelineSource
from .table import component_for, pipeline_for

ShiftPolicy = Literal["error", "drop"]


@dataclass
class SitePlan:
    site: DSite
    exactness: str  # exact | scale only (shift dropped) | identity
    scale_into: list[str] = field(default_factory=list)
    shift_into: list[str] = field(default_factory=list)
    note: str = ""

    def row(self) -> dict[str, str]:
        s = self.site
        return {
            "site": f"{s.component}/{s.name}" + (f"[{s.block}]" if s.block is not None else ""),
            "key": s.key,
            "class": self.exactness,
            "scale →": ", ".join(self.scale_into) or "-",
            "shift →": ", ".join(self.shift_into) or "-",
            "config": "-",  # pipelines never need a config change (no bias is ever added)
            "note": self.note,
        }


@dataclass
class Edit:
    """New tensors for one module: ``kind`` norm (x̂·γ+β or x̂·g) or linear ([out, in] weight)."""

    kind: Literal["norm", "linear"]
    weight: str  # tensor names in the checkpoint
    bias: str | None
    inputs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # forward order
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


@dataclass
class PipelinePlan:
    strength: float
    sites: list[SitePlan]
    edits: dict[str, dict[str, Edit]]  # component → module → edit

    def rows(self) -> list[dict[str, str]]:
        return [sp.row() for sp in self.sites]

    def edited_tensors(self, component: str) -> dict[str, str]:
        out = {}
        for module, e in self.edits.get(component, {}).items():
            out[e.weight] = module
            if e.bias:
                out[e.bias] = module
        return out

    def compute(
        self, component: str, module: str, read: Callable[[str], torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return fold(self.edits[component][module], read, f"{component}/{module}")


def _compose(ops: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ops in forward order → one ``a ↦ s·a + c``."""
    s, c = torch.ones(n), torch.zeros(n)
    for scale, shift in ops:
        s, c = scale * s, scale * c + shift
    return s, c


def fold(e: Edit, read: Callable[[str], torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Float32 math, cast back to the checkpoint dtype once; NaN/Inf refused."""
    w0 = read(e.weight)
    dtype = w0.dtype
    w = w0.float()
    b = read(e.bias).float() if e.bias else None
    if e.kind == "norm":  # x̂·γ + β → s(x̂·γ + β) + c
        s, c = _compose(e.outputs, w.shape[0])
        w = w * s
        if b is not None:
            b = b * s + c
    else:
        if e.inputs:  # W(s·a + c) + b = (W·diag(s))·a + (b + W c)
            s, c = _compose(e.inputs, w.shape[1])
            if b is not None:
                b = b + (w.double() @ c.double()).float()
            w = w * s[None, :]
        if e.outputs:  # s(Wa + b) + c
            s, c = _compose(e.outputs, w.shape[0])
            w = w * s[:, None]
            if b is not None:
                b = b * s + c
    out = {e.weight: w.to(dtype)}
    if e.bias:
        out[e.bias] = b.to(dtype)
    for name, t in out.items():
        if not torch.isfinite(t).all():
            raise NotFoldableError(
                f"folding into {where} ({name}) produced NaN/Inf: the maps are not finite or overflow "
                f"{dtype}. Refit, lower the strength, or bake a float32 checkpoint."
            )
    return out


class _Namer:
    """Module path → the checkpoint's tensor name (exact, or through the row's prefix aliases)."""

    def __init__(self, source: PipelineSource, component: str):
        arch = component_for(source.components.get(component, ""))
        self.prefixes = arch.tensor_prefixes if arch else ()
        self.tensors = source.tensors(component)

    def __call__(self, module: str, leaf: str) -> str | None:
        name = f"{module}.{leaf}"
        if name in self.tensors:
            return name
        for a, b in self.prefixes:
            for src, dst in ((a, b), (b, a)):
                if name.startswith(src) and dst + name[len(src) :] in self.tensors:
                    return dst + name[len(src) :]
        return None


def shift_home(source: PipelineSource, site: DSite) -> tuple[list[tuple[str, str]], str]:
    """Where a shift at ``site`` folds: ([(component, module with a bias), …], '') or ([], why not)."""
    rule = site.rule
    name = _Namer(source, site.component)
    if rule.fold == "norm" or rule.fold == "linear_out":
        if name(site.module, "bias") is None:
            return [], f"{site.module} has no bias to take the shift"
        return [(site.component, site.module)], ""
    consumers = [site.path(c) for c in rule.consumers if name(site.path(c), "weight")]
    missing = [c for c in consumers if name(c, "bias") is None]
    if consumers and not missing:
        return [(site.component, c) for c in consumers], ""
    if rule.fold == "rmsnorm" and rule.text_output:
        return _text_route(source, site)
    return (
        [],
        f"{', '.join(missing or consumers)} {'has' if len(missing) == 1 else 'have'} no bias to take the shift",
    )


def _text_route(source: PipelineSource, site: DSite) -> tuple[list[tuple[str, str]], str]:
    row = pipeline_for(source.pipeline_class)
    if row is None:
        return [], (
            f"the pipeline class {source.pipeline_class!r} has no row in actmerge's pipeline table, so where "
            f"{site.component}'s output goes is unknown (add one to actmerge/diffusion/table.py PIPELINES)"
        )
    into = row.text_into.get(site.component)
    if into is None:
        return [], f"{source.pipeline_class} has no known layer that reads {site.component}'s output"
    if isinstance(into, str):
        return [], into
    component, module = into
    if _Namer(source, component)(module, "bias") is None:
        return [], f"{component}/{module} has no bias to take the shift"
    return [(component, module)], ""


def plan(
    source: PipelineSource, maps: MapSet, strength: float, *, shift_policy: ShiftPolicy = "error"
) -> PipelinePlan:
    """Plan the fold of ``maps`` at ``strength`` into the pipeline's weights."""
    edits: dict[str, dict[str, Edit]] = {}
    sites: list[SitePlan] = []
    refused: list[str] = []
    for key, amap in maps.items():
        site = site_for_key(source, key)
        scale, shift = amap.at(strength)
        _check_dim(source, site, amap.dim)
        has_scale, has_shift = bool((scale != 1).any()), bool((shift != 0).any())
        sp = SitePlan(site, "exact" if (has_scale or has_shift) else "identity")
        sites.append(sp)
        if sp.exactness == "identity":
            continue
        homes: list[tuple[str, str]] = []
        if has_shift:
            homes, why = shift_home(source, site)
            if not homes:
                if shift_policy == "error":
                    refused.append(f"  {key} ({site.name}): {why}")
                    continue
                shift, has_shift = torch.zeros_like(shift), False
                sp.exactness, sp.note = "scale only (shift dropped)", why
                if not has_scale:
                    continue
        _place(source, site, sp, scale if has_scale else None, shift if has_shift else None, homes, edits)
    if refused:
        raise NotFoldableError(
            "these maps have shifts that cannot be folded exactly:\n" + "\n".join(refused) + "\nRemedies: "
            "`--shift-policy drop` bakes their scales only; fit scale-only maps (`fit_shift: false`); or "
            "choose sites whose layers are biased (`actmerge sites PIPELINE_DIR`)."
        )
    return PipelinePlan(strength, sites, edits)


def _edit(source, site: DSite, component: str, module: str, kind, edits) -> Edit:
    comp = edits.setdefault(component, {})
    if module not in comp:
        name = _Namer(source, component)
        weight = name(module, "weight")
        if weight is None:
            raise NotFoldableError(
                f"{component}/{module} has no weight tensor (a norm without affine parameters?): a map at "
                f"{site.key} has nowhere to go. Choose the biased layers that read it instead."
            )
        comp[module] = Edit(kind, weight, name(module, "bias"))
    return comp[module]


def _place(source, site: DSite, sp: SitePlan, scale, shift, homes, edits) -> None:
    rule = site.rule
    n = (scale if scale is not None else shift).numel()
    one, zero = torch.ones(n), torch.zeros(n)
    if rule.fold in ("norm", "rmsnorm"):
        e = _edit(source, site, site.component, site.module, "norm", edits)
        own_shift = shift if (shift is not None and rule.fold == "norm") else None
        e.outputs.append((scale if scale is not None else one, own_shift if own_shift is not None else zero))
        if scale is not None:
            sp.scale_into = [e.weight] + ([e.bias] if e.bias else [])
        if own_shift is not None:
            sp.shift_into = [e.bias]
        if shift is not None and rule.fold == "rmsnorm":
            for component, module in homes:  # b' = b + W c in each consumer (maybe in the denoiser)
                ce = _edit(source, site, component, module, "linear", edits)
                ce.inputs.insert(0, (one, shift))  # upstream of any map at that layer's own input
                sp.shift_into.append(f"{component}/{ce.bias}" if component != site.component else ce.bias)
    elif rule.fold == "linear_in":
        name = _Namer(source, site.component)
        present = [site.path(c) for c in rule.consumers if name(site.path(c), "weight")]
        if not present:  # e.g. SD3's last block has no ff_context
            raise MapsMismatchError(
                f"{site.key}: none of the layers that read it ({', '.join(rule.consumers)}) exist."
            )
        for module in present:  # T5: wi, or wi_0 and wi_1 (gated)
            e = _edit(source, site, site.component, module, "linear", edits)
            e.inputs.append((scale if scale is not None else one, shift if shift is not None else zero))
            if scale is not None:
                sp.scale_into.append(e.weight)
            if shift is not None:
                sp.shift_into.append(e.bias)
    else:  # linear_out
        e = _edit(source, site, site.component, site.module, "linear", edits)
        e.outputs.append((scale if scale is not None else one, shift if shift is not None else zero))
        if scale is not None:
            sp.scale_into = [e.weight] + ([e.bias] if e.bias else [])
        if shift is not None:
            sp.shift_into = [e.bias]


def site_dim(source: PipelineSource, site: DSite) -> int | None:
    """The channel count a map at ``site`` must have (None if the checkpoint lacks the tensor)."""
    tensors = source.tensors(site.component)
    name = _Namer(source, site.component)
    if site.rule.fold == "linear_in":
        ws = [w for c in site.rule.consumers if (w := name(site.path(c), "weight"))]
        return tensors[ws[0]].shape[1] if ws else None
    w = name(site.module, "weight")
    return tensors[w].shape[0] if w else None


def _check_dim(source: PipelineSource, site: DSite, dim: int) -> None:
    """The map's length must be the site's channel count; per-pixel maps are refused by name."""
    n = site_dim(source, site)
    if n is None or n == dim:
        return
    if site.rule.spatial and dim % n == 0:
        raise NotFoldableError(
            f"the map at {site.key} has {dim} = {n}×{dim // n} values: a per-pixel map on a {n}-channel "
            "feature map. A GroupNorm holds one affine per channel, so only per-channel maps fold "
            "(feature_maps: per_channel, with pixels as samples)."
        )
    raise MapsMismatchError(
        f"map of dim {dim} does not fit {site.key} (dim {n}): maps from another pipeline?"
    )


def capabilities(source: PipelineSource) -> list[dict[str, str]]:
    """Per component and site: blocks found, where a scale and a shift fold (``actmerge sites DIR``)."""
    from .sites import component_arch, resolve

    rows = []
    for component, cls in source.components.items():
        if component_for(cls) is None:
            continue
        arch = component_arch(source, component)
        for name, rule in arch.sites.items():
            found = resolve(source, f"{component}/{name}", None)
            if not found:
                continue
            homes, why = shift_home(source, found[0])
            rows.append(
                {
                    "component": f"{component} ({cls})",
                    "site": name,
                    "module": found[0].module if rule.block is None else f"<{rule.block}>.{rule.module}",
                    "side": rule.side,
                    "blocks": str(len(found)) if rule.block else "-",
                    "scale": "exact",
                    "shift": "exact → " + ", ".join(m if c == component else f"{c}/{m}" for c, m in homes)
                    if homes
                    else f"not foldable: {why}",
                    "about": rule.about,
                }
            )
        for name, why in arch.refused.items():
            rows.append(
                {
                    "component": f"{component} ({cls})",
                    "site": name,
                    "module": "-",
                    "side": "-",
                    "blocks": "-",
                    "scale": "refused",
                    "shift": "refused",
                    "about": why,
                }
            )
    return rows
