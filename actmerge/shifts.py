"""Where a shift can go, per architecture and config: the biases of the linears that read a site
(present, behind a config flag, or absent), and which runtimes load them. Pure table logic over
``sites.py``; the fold planner and fold-aware fitting both ask here."""

from __future__ import annotations

from typing import Any

from .sites import ALL, RUNTIMES, Architecture


def config_get(config: dict, dotted: str) -> Any:
    value: Any = config
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _bias_roles(rule) -> list[str]:
    """The linear roles whose bias takes a shift at this site."""
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
        if lin.bias != "always" and not config_get(config, lin.bias):
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


# fold kinds whose scale goes into a norm gain: F32 in every GGUF, so exact in a quantised one
NORM_FOLDS = ("rmsnorm", "rmsnorm_1p", "layernorm")


def scale_home(arch: Architecture, site_name: str, targets: frozenset[str] = frozenset()) -> tuple[bool, str]:
    """Can a scale at this site fold for these targets? → (ok, why not). Everywhere, except that
    ``gguf`` (a quantised GGUF) takes scales in norm gains only: a linear's weight is quantised."""
    rule = arch.sites[site_name]
    if "gguf" in targets and rule.fold not in NORM_FOLDS:
        return False, (
            f"its scale goes into {rule.module}'s weight, which a quantised GGUF stores quantised "
            "(--target gguf keeps norm gains and loadable biases only)"
        )
    return True, ""


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
