"""Model card (README.md of a baked checkpoint): YAML front matter + what was steered and how."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from . import __version__
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


def render(
    info,
    *,
    license: str | None,
    description: str = "",
    evaluation: str = "",
    reproduce: str = "",
    chat: bool = False,
) -> str:
    """The model card of a bake (``info``: ``io.provenance.BakeInfo``), language model or pipeline."""
    pipeline = info.kind == "pipeline"
    base_model, method, recipe_name = info.base_model, info.method, info.recipe
    license = license or BUILTIN_BASES.get(base_model, (None, None))[1]
    hub_id = hub_base_model(base_model)
    tags = list(dict.fromkeys(["actmerge", "activation-steering", "steering", method, recipe_name]))
    front = {
        **({"base_model": hub_id, "base_model_relation": "finetune"} if hub_id else {}),
        "library_name": "diffusers" if pipeline else "transformers",
        "pipeline_tag": "text-to-image" if pipeline else "text-generation",
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
    if pipeline:
        lines += [
            f"This pipeline is **{base_model}** ({info.pipeline_class}) with activation steering baked into "
            f"the weights of {', '.join(info.edited_components) or 'no component'} by actmerge {__version__}. "
            "It loads in plain diffusers (no actmerge, no hooks) and runs at the base pipeline's speed; the "
            "other components are byte-identical copies.",
            "",
        ]
    else:
        lines += [
            f"This checkpoint is **{base_model}** with activation steering baked into its weights by "
            f"[actmerge](https://pypi.org/project/actmerge/) {__version__}. It loads in plain transformers "
            "(no actmerge code, no hooks) and runs at the base model's speed.",
            "",
        ]
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
    unit = "channel" if pipeline else "neuron"
    lines += [
        "## How it was steered",
        "",
        f"- method: `{method}` (per-{unit} affine transport maps `T(a) = ω·a + β`"
        + (", fitted at the first denoising step)" if pipeline else ")"),
        f"- strength: λ = {info.strength:g} (the model sees `(1−λ+λω)·a + λβ`"
        + (" at every step)" if pipeline else ")"),
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
    lines += _usage_pipeline() if pipeline else _usage_llm(info.runtimes, chat)
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


def _usage_pipeline() -> list[str]:
    return [
        "Quality on this pipeline was not measured by actmerge: check images before and after.",
        "",
        "## Use",
        "",
        "```python",
        "import torch",
        "from diffusers import DiffusionPipeline",
        f'pipe = DiffusionPipeline.from_pretrained("{REPO_PLACEHOLDER}", torch_dtype=torch.float16)',
        "```",
        "",
    ]


def _usage_llm(runtimes: list[str], chat: bool) -> list[str]:
    loads = (
        f"Every edit loads in: {', '.join(sorted(runtimes))}."
        if runtimes
        else "Which runtimes load every edit: `runtimes` in `actmerge/bake.json`."
    )
    snippet = [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{REPO_PLACEHOLDER}")',
        f'tok = AutoTokenizer.from_pretrained("{REPO_PLACEHOLDER}")',
    ]
    if chat:
        snippet += [
            "# an instruct model: talk to it through its chat template",
            'messages = [{"role": "user", "content": "What should I cook tonight?"}]',
            "inputs = tok.apply_chat_template(",
            '    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True',
            ")",
            "out = model.generate(**inputs, max_new_tokens=64)",
            'print(tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))',
        ]
    return [
        "## Use",
        "",
        f"A plain checkpoint: no actmerge, no hooks. {loads}",
        "",
        "transformers:",
        "",
        "```python",
        *snippet,
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
