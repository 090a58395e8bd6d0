"""Model card (README.md of a baked checkpoint): YAML front matter + what was steered and how."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from . import __version__


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


def render(
    *,
    base_model: str,
    method: str,
    recipe_name: str,
    strength: float,
    plan_rows: list[dict],
    config_patch: dict,
    license: str | None,
    description: str = "",
    evaluation: str = "",
    reproduce: str = "",
) -> str:
    front = {
        "base_model": base_model,
        "base_model_relation": "finetune",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["actmerge", "activation-steering", "steering", method, recipe_name],
        "license": license or "other",
    }
    sites = sorted({r["site"].split("[")[0] for r in plan_rows if r["class"] != "identity"})
    classes = sorted({r["class"] for r in plan_rows})
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {base_model.split('/')[-1]} — {recipe_name} (actmerge, λ = {strength:g})",
        "",
        f"This checkpoint is **{base_model}** with activation steering baked into its weights by "
        f"[actmerge](https://pypi.org/project/actmerge/) {__version__}. It loads in plain transformers "
        "(no actmerge code, no hooks) and runs at the base model's speed.",
        "",
    ]
    if description:
        lines += [description.strip(), ""]
    if license is None:
        lines += ["> The base model's license could not be determined: check it before redistributing.", ""]
    lines += [
        "## How it was steered",
        "",
        f"- method: `{method}` (per-neuron affine transport maps `T(a) = ω·a + β`)",
        f"- strength: λ = {strength:g} (the model sees `(1−λ+λω)·a + λβ`)",
        f"- sites: {', '.join(sites) or 'none'} ({len(plan_rows)} module sides)",
        f"- fold classes: {', '.join(classes)}",
        f"- config changes: {', '.join(f'`{k}={v}`' for k, v in config_patch.items()) or 'none'}",
        "",
        "The maps (`actmerge/maps.safetensors`) and the recipe (`actmerge/recipe.yaml`) are included.",
        "",
        "<details><summary>Fold report</summary>",
        "",
        "| site | class | scale → | shift → | config |",
        "|---|---|---|---|---|",
        *[
            f"| {r['site']} | {r['class']} | {r['scale →']} | {r['shift →']} | {r['config']} |"
            for r in plan_rows
        ],
        "",
        "</details>",
        "",
    ]
    if evaluation:
        lines += ["## Evaluation", "", evaluation.strip(), ""]
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("<this repo>")',
        'tok = AutoTokenizer.from_pretrained("<this repo>")',
        "```",
        "",
    ]
    if reproduce:
        lines += ["## Reproduce", "", "```bash", reproduce, "```", ""]
    return "\n".join(lines)
