"""A language model's parts of the model card (``card.render``)."""

from __future__ import annotations

from ... import __version__
from ...card import REPO_PLACEHOLDER, KindText, base_license


def text(info, chat: bool) -> KindText:
    """The card text of a checkpoint (``info``: ``BakeInfo``); ``chat``: it ships a chat template."""
    return KindText(
        library_name="transformers",
        pipeline_tag="text-generation",
        intro=(
            f"This checkpoint is **{info.base_model}** with activation steering baked into its weights by "
            f"[actmerge](https://pypi.org/project/actmerge/) {__version__}. It loads in plain transformers "
            "(no actmerge code, no hooks) and runs at the base model's speed."
        ),
        unit="neuron",
        usage=usage(info.runtimes, chat),
    )


def license_of(source) -> str | None:
    """The base checkpoint's license (its card, else its config)."""
    return base_license(source.path, source.config)


def usage(runtimes: list[str], chat: bool) -> list[str]:
    """The card's Use section: transformers (through the chat template for an instruct model), vLLM,
    llama.cpp."""
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
