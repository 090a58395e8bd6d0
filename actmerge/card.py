"""Model card (README.md of a baked checkpoint): YAML front matter + what was steered and how."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from . import __version__

REPO_PLACEHOLDER = "<this repo>"  # in the usage snippets; the repo id is not known when baking
# Built-in aliases are not Hub ids: the Hub repo (front matter `base_model`) and license they stand for.
BUILTIN_BASES = {"gemma-3-270m": ("google/gemma-3-270m", "gemma")}
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def hub_base_model(name: str) -> str | None:
    """``name`` as a Hub model id for the front matter, or None for local paths and .gguf files (the
    Hub rejects a card whose `base_model` is not a model id)."""
    if name in BUILTIN_BASES:
        return BUILTIN_BASES[name][0]
    if name.endswith(".gguf") or name.startswith((".", "/", "~")) or Path(name).expanduser().exists():
        return None
    return name if _HUB_ID.fullmatch(name) and ".." not in name and "--" not in name else None


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
    runtimes: list[str] | None = None,
    tuned: dict | None = None,
) -> str:
    license = license or BUILTIN_BASES.get(base_model, (None, None))[1]
    hub_id = hub_base_model(base_model)
    tags = list(dict.fromkeys(["actmerge", "activation-steering", "steering", method, recipe_name]))
    front = {
        **({"base_model": hub_id, "base_model_relation": "finetune"} if hub_id else {}),
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": tags,
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
        lines += [
            "> The base model's license could not be determined (`license: other` above): check it "
            "before redistributing, and set `license:` in this card.",
            "",
        ]
    lines += [
        "## How it was steered",
        "",
        f"- method: `{method}` (per-neuron affine transport maps `T(a) = ω·a + β`)",
        f"- strength: λ = {strength:g} (the model sees `(1−λ+λω)·a + λβ`)",
        *([_tuned_line(tuned)] if tuned else []),
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
    loads = (
        f"Every edit loads in: {', '.join(sorted(runtimes))}."
        if runtimes
        else "Which runtimes load every edit: `runtimes` in `actmerge/bake.json`."
    )
    lines += [
        "## Use",
        "",
        f"A plain checkpoint: no actmerge, no hooks. {loads}",
        "",
        "transformers:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{REPO_PLACEHOLDER}")',
        f'tok = AutoTokenizer.from_pretrained("{REPO_PLACEHOLDER}")',
        "```",
        "",
        "vLLM:",
        "",
        "```bash",
        f"vllm serve {REPO_PLACEHOLDER}",
        "```",
        "",
        "```python",
        "from vllm import LLM",
        f'llm = LLM(model="{REPO_PLACEHOLDER}")',
        "```",
        "",
        "llama.cpp (`actmerge export-gguf` runs llama.cpp's own converter and first strips all-zero biases "
        "that llama.cpp rejects, e.g. a Gemma o_proj bias added by `attention_bias`):",
        "",
        "```bash",
        f"hf download {REPO_PLACEHOLDER} --local-dir model",
        "actmerge export-gguf model -o model.gguf --outtype f16",
        'llama-cli -m model.gguf -p "Hello"',
        "```",
        "",
    ]
    if reproduce:
        lines += ["## Reproduce", "", "```bash", reproduce, "```", ""]
    return "\n".join(lines)


def _tuned_line(tuned: dict) -> str:
    """The card's account of a strength chosen by ``actmerge tune`` (``tune.provenance``)."""
    cost = tuned["cost_on_tuning_text"]
    metric = next(k for k in tuned if k.endswith("_on_tuning_prompts"))
    name = metric.removesuffix("_on_tuning_prompts")
    return (
        f"- strength chosen by `actmerge tune`: the strongest λ within the budget {tuned['budget']['text']} "
        f"on the recipe's tuning text (measured: perplexity ×{cost['perplexity_ratio']:.3f}, "
        f"KL {cost['kl']:.3g} nats/token; {name} on the tuning prompts "
        f"{tuned['base_' + name]:.3g} → {tuned[metric]:.3g})"
    )
