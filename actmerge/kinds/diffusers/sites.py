"""Resolve diffusion sites: recipe site names (+ block selection) and raw keys → concrete sites.

A site key is ``<component>/<module path>:<input|output>``, e.g.
``unet/down_blocks.1.attentions.0.transformer_blocks.0.norm1:output``. A recipe names a site
(``text_attn_in``) for every component that has it, or for one component
(``text_encoder_2/text_attn_in``). Blocks are found in the checkpoint's tensor names (no model is
loaded) and numbered in forward order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from ...errors import NotFoldableError, SiteError, UnknownArchitectureError
from ...sites import parse_layers
from .source import PipelineSource
from .table import UNET_STAGES, Component, Rule, component_for, known_classes


@dataclass(frozen=True)
class DSite:
    name: str
    component: str  # pipeline folder, e.g. "text_encoder_2"
    arch: Component = field(repr=False)
    block: int | None  # index among the component's blocks of the rule's kind
    prefix: str  # the block's module path ('' for global sites)
    rule: Rule = field(repr=False)

    @property
    def module(self) -> str:
        return f"{self.prefix}.{self.rule.module}" if self.prefix else self.rule.module

    @property
    def key(self) -> str:
        return f"{self.component}/{self.module}:{self.rule.side}"

    def path(self, relative: str) -> str:
        """A module path relative to this site's block (consumers) as a full path."""
        return f"{self.prefix}.{relative}" if self.prefix else relative


def split_key(key: str) -> tuple[str, str, str]:
    """``component/module:side`` → (component, module, side)."""
    component, slash, rest = key.partition("/")
    module, _, side = rest.rpartition(":")
    if not slash or not module or side not in ("input", "output"):
        raise SiteError(f"{key!r}: a diffusion site key is '<component>/<module>:<input|output>'.")
    return component, module, side


def component_arch(source: PipelineSource, component: str) -> Component:
    if component not in source.components:
        raise SiteError(
            f"the pipeline has no component {component!r} (it has: {', '.join(source.components)})."
        )
    cls = source.components[component]
    arch = component_for(cls)
    if arch is None:
        raise UnknownArchitectureError(
            f"component {component!r} is a {cls}, which has no row in actmerge's diffusion table "
            f"(known: {', '.join(known_classes())}). Steer another component, or add a row to "
            "actmerge/kinds/diffusers/table.py COMPONENTS."
        )
    return arch


def blocks(arch: Component, kind: str, modules: frozenset[str]) -> list[str]:
    """Block prefixes of one kind, in forward order (UNet: down, mid, up; then by index)."""
    pattern = re.compile(rf"^({arch.blocks[kind]})(?:\.|$)")
    found = {m.group(1) for name in modules if (m := pattern.match(name))}
    return sorted(found, key=_forward_order)


def _forward_order(prefix: str) -> tuple:
    parts = prefix.split(".")
    stage = UNET_STAGES.index(parts[0]) if parts[0] in UNET_STAGES else -1
    return (stage, *[(int(p), "") if p.isdigit() else (-1, p) for p in parts])


def resolve(source: PipelineSource, spec: str, layers: str | list[int] | None) -> list[DSite]:
    """One recipe site name (optionally ``component/name``) × block selection → sites."""
    component, _, name = spec.rpartition("/")
    targets = [component] if component else list(source.components)
    out: list[DSite] = []
    known = False
    for comp in targets:
        if component:
            arch = component_arch(source, comp)
        else:
            arch = component_for(source.components[comp])
            if arch is None:
                continue
        if name in arch.refused:
            raise NotFoldableError(
                f"{comp}/{name} cannot be baked into a {arch.name} component: {arch.refused[name]}"
            )
        if name not in arch.sites:
            if component:
                raise SiteError(
                    f"site {name!r} does not exist for {comp} ({arch.name}); available: {', '.join(arch.sites)}."
                )
            continue
        known = True
        out += _expand(source, comp, arch, name, layers)
    if not known:
        raise SiteError(
            f"no component of this {source.pipeline_class or 'pipeline'} has a site {name!r}. "
            "Run `actmerge sites PIPELINE_DIR` to list them."
        )
    return out


def _expand(source, comp: str, arch: Component, name: str, layers) -> list[DSite]:
    rule = arch.sites[name]
    modules = source.modules(comp)
    if rule.block is None:
        return [DSite(name, comp, arch, None, "", _global(rule, modules, comp))]
    found = blocks(arch, rule.block, modules)
    chosen = [found[i] for i in parse_layers(layers, len(found))]
    # a block kind may lack the module (SD3's last block has no ff_context): only blocks that have it
    return [
        DSite(name, comp, arch, found.index(p), p, rule)
        for p in chosen
        if _has_module(f"{p}.{rule.module}", rule, p, modules)
    ]


def _global(rule: Rule, modules: frozenset[str], component: str) -> Rule:
    """A global rule names its module by the end of its path (``final_layer_norm`` is
    ``text_model.final_layer_norm`` in CLIPTextModelWithProjection): the one module that matches."""
    found = [m for m in modules if m == rule.module or m.endswith("." + rule.module)]
    if len(found) != 1:
        raise SiteError(
            f"{component}: expected one module named {rule.module!r}, found {sorted(found) or 'none'}."
        )
    return replace(rule, module=found[0])


def _has_module(module: str, rule: Rule, prefix: str, modules: frozenset[str]) -> bool:
    targets = [f"{prefix}.{c}" for c in rule.consumers] if rule.consumers else [module]
    return any(t in modules for t in targets)


def site_for_key(source: PipelineSource, key: str) -> DSite:
    """Match a raw key (maps files, expert recipes) to a table rule."""
    component, module, side = split_key(key)
    arch = component_arch(source, component)
    modules = source.modules(component)
    for name, rule in arch.sites.items():
        if rule.side != side:
            continue
        if rule.block is None:
            if module in modules and (module == rule.module or module.endswith("." + rule.module)):
                return DSite(name, component, arch, None, "", replace(rule, module=module))
            continue
        prefix = module[: -len(rule.module) - 1] if module.endswith("." + rule.module) else None
        if prefix is None or not re.fullmatch(arch.blocks[rule.block], prefix):
            continue
        found = blocks(arch, rule.block, modules)
        if prefix in found:
            return DSite(name, component, arch, found.index(prefix), prefix, rule)
    raise SiteError(
        f"{key!r} is not a site actmerge can fold in a {arch.name} component: raw modules must be one of "
        f"the table's ({', '.join(f'{r.module}:{r.side}' for r in arch.sites.values())}) inside its blocks."
    )
