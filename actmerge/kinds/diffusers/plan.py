"""Fold planning for pipelines (pure: no I/O beyond headers, no model). Rules: table.py.

Only the *placement* of diffusion sites lives here: which module takes a scale, where a T5 shift
goes. ``plan()`` returns the same ``fold.FoldPlan`` the language-model planner does, with edits keyed
by (component, module); the tensor math is ``fold.compute``. Several ops on one side of one linear
(a T5 shift routed into caption_projection.linear_1 plus a map at that layer's input) are composed
in forward order by it.
"""

from __future__ import annotations

from ...errors import MapsMismatchError, NotFoldableError
from ...fold import Edit, Exactness, FoldOptions, FoldPlan, SitePlan, refuse_shifts
from ...maps import MapSet
from ...naming import TensorNamer
from .sites import DSite, site_for_key
from .source import PipelineSource
from .table import component_for, pipeline_for


class _Namer:
    """Module path + leaf → the component checkpoint's tensor name (``naming.TensorNamer``
    with the component row's prefix aliases)."""

    def __init__(self, source: PipelineSource, component: str):
        arch = component_for(source.components.get(component, ""))
        self.namer = TensorNamer(source.tensors(component), arch.tensor_prefixes if arch else ())

    def __call__(self, module: str, leaf: str) -> str | None:
        return self.namer(f"{module}.{leaf}")


def shift_home(source: PipelineSource, site: DSite) -> tuple[list[tuple[str, str]], str]:
    """Where a shift at ``site`` folds: ([(component, module with a bias), …], '') or ([], why not)."""
    rule = site.rule
    name = _Namer(source, site.component)
    if rule.fold == "layernorm" or rule.fold == "linear_out":
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
            f"{site.component}'s output goes is unknown (add one to actmerge/kinds/diffusers/table.py PIPELINES)"
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
    source: PipelineSource, maps: MapSet, strength: float, options: FoldOptions = FoldOptions()
) -> FoldPlan:
    """Plan the fold of ``maps`` at ``strength`` into the pipeline's weights (edits keyed by
    (component, module)). A pipeline bake never adds a bias or changes a config."""
    edits: dict[tuple[str, str], Edit] = {}
    sites: list[SitePlan] = []
    refused: list[str] = []
    for key, amap in maps.items():
        site = site_for_key(source, key)
        scale, shift = amap.at(strength)
        _check_dim(source, site, amap.dim)
        has_scale, has_shift = bool((scale != 1).any()), bool((shift != 0).any())
        label = f"{site.component}/{site.name}" + (f"[{site.block}]" if site.block is not None else "")
        sp = SitePlan(
            key, label, Exactness.EXACT if (has_scale or has_shift) else Exactness.IDENTITY, site=site
        )
        sites.append(sp)
        if sp.exactness is Exactness.IDENTITY:
            continue
        homes: list[tuple[str, str]] = []
        if has_shift:
            homes, why = shift_home(source, site)
            if not homes:
                if options.shift_policy == "error":
                    refused.append(f"  {key} ({site.name}): {why}")
                    continue
                has_shift = False
                sp.exactness, sp.note = Exactness.SCALE_ONLY, why
                if not has_scale:
                    continue
        _place(source, site, sp, scale if has_scale else None, shift if has_shift else None, homes, edits)
    if refused:
        raise refuse_shifts(refused, "PIPELINE_DIR")
    return FoldPlan(strength, sites, edits)


def _edit(source, site: DSite, component: str, module: str, kind, edits) -> Edit:
    if (component, module) not in edits:
        name = _Namer(source, component)
        weight = name(module, "weight")
        if weight is None:
            raise NotFoldableError(
                f"{component}/{module} has no weight tensor (a norm without affine parameters?): a map at "
                f"{site.key} has nowhere to go. Choose the biased layers that read it instead."
            )
        edits[(component, module)] = Edit(kind, weight, name(module, "bias"))
    return edits[(component, module)]


def _place(source, site: DSite, sp: SitePlan, scale, shift, homes, edits) -> None:
    rule = site.rule
    if rule.fold in ("layernorm", "rmsnorm"):
        e = _edit(source, site, site.component, site.module, "norm", edits)
        own_shift = shift if rule.fold == "layernorm" else None
        e.outputs.append((scale, own_shift))
        if scale is not None:
            sp.scale_into = [e.weight] + ([e.bias] if e.bias else [])
        if own_shift is not None:
            sp.shift_into = [e.bias]
        if shift is not None and rule.fold == "rmsnorm":
            for component, module in homes:  # b' = b + W c in each consumer (maybe in the denoiser)
                ce = _edit(source, site, component, module, "linear", edits)
                ce.inputs.insert(0, (None, shift))  # upstream of any map at that layer's own input
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
            e.inputs.append((scale, shift))
            if scale is not None:
                sp.scale_into.append(e.weight)
            if shift is not None:
                sp.shift_into.append(e.bias)
    else:  # linear_out
        e = _edit(source, site, site.component, site.module, "linear", edits)
        e.outputs.append((scale, shift))
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
