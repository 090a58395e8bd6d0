"""Placement of language-model sites into fold edits (the counterpart of ``diffusion/plan.py``):
where each map's scale and shift go for an architecture row of ``sites.py``, the config flags a shift
needs, the companion biases those flags make the model expect, and the tied-tensor guard. The
tensor math is ``fold.compute``."""

from __future__ import annotations

from typing import Any

from ...errors import MapsMismatchError, NotFoldableError, SiteError
from ...fold import Edit, Exactness, FoldOptions, FoldPlan, SitePlan, nonzero, not_one, refuse_shifts
from ...io.st_format import TensorInfo
from ...maps import MapSet
from ...naming import TensorNamer
from ...shifts import config_get, scale_home, shift_home
from ...sites import ALL, Architecture, site_for_key

NORM_EDIT = {"rmsnorm": "norm", "rmsnorm_1p": "norm_1p", "layernorm": "norm"}  # site fold → Edit kind


def plan(
    arch: Architecture,
    config: dict,
    maps: MapSet,
    strength: float,
    tensors: dict[str, TensorInfo],
    options: FoldOptions = FoldOptions(),
) -> FoldPlan:
    """Plan the fold of ``maps`` at ``strength`` into a language-model checkpoint with ``tensors``."""
    namer = TensorNamer(tensors, arch.tensor_prefixes)

    def name_of(param: str) -> str:
        found = namer(param)
        if found is None:
            raise MapsMismatchError(f"tensor {param} is not in the checkpoint: maps from another model?")
        return found

    edits: dict[tuple[str, str], Edit] = {}
    site_plans: list[SitePlan] = []
    config_patch: dict[str, Any] = {}
    refused: list[str] = []
    refused_scales: list[str] = []

    def edit(module: str, kind: str, conv1d: bool = False, want_bias: bool = False) -> Edit:
        if ("", module) not in edits:
            edits[("", module)] = Edit(kind, name_of(f"{module}.weight"), namer(f"{module}.bias"), conv1d)
        e = edits[("", module)]
        if want_bias and e.bias is None:
            e.bias, e.new_bias = _bias_name(e.weight), True
        return e

    for key, amap in maps.items():
        try:
            site = site_for_key(arch, config, key)
        except Exception as exc:
            raise MapsMismatchError(f"maps do not match this {arch.name} model: {exc}") from exc
        scale, shift = amap.at(strength)
        has_scale, has_shift = not_one(scale), nonzero(shift)
        sp = SitePlan(key, f"{site.name}[{site.layer}]", Exactness.EXACT, site=site)
        site_plans.append(sp)
        if not (has_scale or has_shift):
            sp.exactness = Exactness.IDENTITY
            continue
        rule = site.rule
        if has_scale and not (ok_scale := scale_home(arch, site.name, options.targets))[0]:
            refused_scales.append(f"  {key} ({site.name}): {ok_scale[1]}")
            continue
        flags, runtimes = {}, ALL
        if has_shift:
            ok, why, flags, runtimes = shift_home(
                arch, config, site.name, targets=options.targets, allow_flags=options.allow_config_change
            )
            if not ok:
                if options.shift_policy == "error":
                    refused.append(f"  {key} ({site.name}): {why}")
                    continue
                has_shift, flags, runtimes = False, {}, ALL
                sp.exactness, sp.note = Exactness.SCALE_ONLY, why
                if not has_scale:
                    continue
        sp.flags, sp.runtimes = flags, runtimes
        if flags:
            sp.exactness = Exactness.EXACT_FLAGS
            config_patch.update(flags)
        s_op, c_op = (scale if has_scale else None), (shift if has_shift else None)
        if rule.fold in NORM_EDIT:
            own_shift = c_op if rule.fold == "layernorm" else None
            e = edit(site.module, NORM_EDIT[rule.fold])
            e.outputs.append((s_op, own_shift))
            if has_scale:
                sp.scale_into = [e.weight] + ([e.bias] if rule.fold == "layernorm" and e.bias else [])
            if own_shift is not None:
                sp.shift_into = [e.bias]
            elif has_shift:
                for role in rule.consumers:  # b' = b + W c in every linear that reads the norm
                    lin = arch.linears[role]
                    ce = edit(arch.layer_module(site.layer, lin.module), "linear", lin.conv1d, want_bias=True)
                    ce.inputs.insert(0, (None, shift))  # upstream of any map at that linear's own input
                    sp.shift_into.append(ce.bias)
        else:
            lin = arch.linears[rule.linear]
            e = edit(site.module, "linear", lin.conv1d, want_bias=has_shift)
            (e.inputs if rule.fold == "linear_in" else e.outputs).append((s_op, c_op))
            if has_scale:
                sp.scale_into = [e.weight] + ([e.bias] if rule.fold == "linear_out" and e.bias else [])
            if has_shift:
                sp.shift_into = [e.bias]
    if refused_scales:
        raise NotFoldableError(
            "these maps have scales that cannot fold exactly into a quantised GGUF (--target gguf):\n"
            + "\n".join(refused_scales)
            + "\nRemedies: choose norm sites (`actmerge sites MODEL --target gguf`), or drop --target gguf "
            "(a GGUF output then re-quantises the edited matrices where the gguf package can, or refuses)."
        )
    if refused:
        raise refuse_shifts(refused, "MODEL")
    new_tensors = _companion_biases(arch, config, config_patch, edits, tensors, name_of)
    _guard_tied(arch, config, edits)
    return FoldPlan(strength, site_plans, edits, config_patch, new_tensors, options.targets)


def check_maps(
    arch: Architecture, config: dict, maps: MapSet, tensors: dict[str, TensorInfo], model: str
) -> None:
    """Every map is finite, names a site of this model and has that site's width (read from the
    checkpoint's tensor headers: cheap, before any model load); else a ``MapsMismatchError`` naming
    the model the maps were fitted on."""
    maps.check_finite()
    namer = TensorNamer(tensors, arch.tensor_prefixes)
    fitted = f"these maps were fitted on {maps.base_model}, not {model}" if maps.base_model else ""
    remedy = (
        f"give the model they were fitted on ({maps.base_model}), or fit maps for {model} with "
        f"`actmerge fit {model} --recipe R -o MAPS`."
        if maps.base_model
        else f"give the model the maps were fitted on, or fit maps for {model} with `actmerge fit`."
    )
    for key, amap in maps.items():
        try:
            site = site_for_key(arch, config, key)
        except SiteError as exc:
            why = str(exc).rstrip(".")
            raise MapsMismatchError(f"{fitted or 'maps do not match'}: {why}; {remedy}") from None
        width = _site_width(arch, site, namer)
        if width is not None and width != amap.dim:
            why = f"the map at {key} has dim {amap.dim}, this model's {site.name} there has dim {width}"
            raise MapsMismatchError(f"{fitted or 'maps do not match'}: {why}; {remedy}")


def _site_width(arch: Architecture, site, namer: TensorNamer) -> int | None:
    """The width of a site's activation, from its module's weight shape (None: no such tensor)."""
    found = namer(f"{site.module}.weight")
    if found is None:
        return None
    shape = namer.tensors[found].shape
    rule = site.rule
    if rule.fold in NORM_EDIT or not shape:
        return shape[0] if shape else None
    conv1d = arch.linears[rule.linear].conv1d
    if rule.fold == "linear_in":
        return shape[0] if conv1d else shape[-1]
    return shape[-1] if conv1d else shape[0]


def _bias_name(weight: str) -> str:
    return weight[: -len("weight")] + "bias"


def _companion_biases(arch, config, patch, edits, tensors, name_of) -> dict[str, tuple[str, TensorInfo]]:
    """Every bias that a newly set flag makes the model expect: edited ones, and zeros elsewhere."""
    out: dict[str, tuple[str, TensorInfo]] = {}
    from ...sites import num_layers

    for layer in range(num_layers(arch, config)):
        for lin in arch.linears.values():
            if lin.bias not in patch:
                continue
            wname = name_of(f"{arch.layer_module(layer, lin.module)}.weight")
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


def _guard_tied(arch: Architecture, config: dict, edits: dict[tuple[str, str], Edit]) -> None:
    if not (
        config_get(config, "tie_word_embeddings") or config_get(config, "text_config.tie_word_embeddings")
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
