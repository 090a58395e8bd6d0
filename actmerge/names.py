"""Short model names: ``gemma-2-2b`` → ``google/gemma-2-2b``. Data only, plus one lookup.

``models.resolve`` consults this table after the built-in offline models (``models.BUILTIN``) and
before treating a name without a slash as unknown; explicit ``org/name`` Hub ids and local paths
never come here. Keys are lower case; the lookup ignores case. Families: those of the site table
(Gemma 2/3, Llama 3.x, Mistral 7B, Qwen2/2.5/3, Phi-3, GPT-2), base and instruct.
Gated on the Hub (accept the licence on the model page, then log in): Gemma, Llama, Mistral.
"""

from __future__ import annotations

import difflib


def _family(org: str, names: list[str]) -> dict[str, str]:
    return {n.lower(): f"{org}/{n}" for n in names}


SHORT_NAMES: dict[str, str] = {
    # Gemma 2: base and instruction-tuned (-it)
    **_family("google", [f"gemma-2-{s}{v}" for s in ("2b", "9b", "27b") for v in ("", "-it")]),
    # Gemma 3: google/gemma-3-270m itself is the built-in offline model (models.BUILTIN)
    **_family("google", ["gemma-3-270m-it"]),
    **_family("google", [f"gemma-3-{s}-{v}" for s in ("1b", "4b", "12b", "27b") for v in ("pt", "it")]),
    **{f"gemma-3-{s}": f"google/gemma-3-{s}-pt" for s in ("1b", "4b", "12b", "27b")},
    # Llama 3.x (meta-llama names them with capitals; the table's keys are lower case)
    **{
        k.lower(): f"meta-llama/{v}"
        for k, v in {
            "llama-3-8b": "Meta-Llama-3-8B",
            "llama-3-8b-instruct": "Meta-Llama-3-8B-Instruct",
            "llama-3-70b": "Meta-Llama-3-70B",
            "llama-3-70b-instruct": "Meta-Llama-3-70B-Instruct",
            "llama-3.1-8b": "Llama-3.1-8B",
            "llama-3.1-8b-instruct": "Llama-3.1-8B-Instruct",
            "llama-3.1-70b": "Llama-3.1-70B",
            "llama-3.1-70b-instruct": "Llama-3.1-70B-Instruct",
            "llama-3.2-1b": "Llama-3.2-1B",
            "llama-3.2-1b-instruct": "Llama-3.2-1B-Instruct",
            "llama-3.2-3b": "Llama-3.2-3B",
            "llama-3.2-3b-instruct": "Llama-3.2-3B-Instruct",
            "llama-3.3-70b-instruct": "Llama-3.3-70B-Instruct",
        }.items()
    },
    # Mistral 7B: the unversioned names are the latest (v0.3)
    **_family(
        "mistralai",
        [f"Mistral-7B{k}-v0.{v}" for k in ("", "-Instruct") for v in (1, 2, 3) if (k, v) != ("", 2)],
    ),
    "mistral-7b": "mistralai/Mistral-7B-v0.3",
    "mistral-7b-instruct": "mistralai/Mistral-7B-Instruct-v0.3",
    # Qwen2, Qwen2.5: base and -Instruct
    **_family("Qwen", [f"Qwen2-{s}{v}" for s in ("0.5B", "1.5B", "7B", "72B") for v in ("", "-Instruct")]),
    **_family(
        "Qwen",
        [
            f"Qwen2.5-{s}{v}"
            for s in ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B")
            for v in ("", "-Instruct")
        ],
    ),
    # Qwen3: the plain names are the post-trained (instruct/thinking) models; -Base the pretrained ones
    **_family("Qwen", [f"Qwen3-{s}{v}" for s in ("0.6B", "1.7B", "4B", "8B", "14B") for v in ("", "-Base")]),
    **_family("Qwen", ["Qwen3-32B"]),
    # Phi-3 / Phi-3.5 (model_type phi3; instruct only: Microsoft published no base weights)
    **_family(
        "microsoft",
        [
            "Phi-3-mini-4k-instruct",
            "Phi-3-mini-128k-instruct",
            "Phi-3-medium-4k-instruct",
            "Phi-3-medium-128k-instruct",
            "Phi-3.5-mini-instruct",
        ],
    ),
    "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
    "phi-3-medium": "microsoft/Phi-3-medium-4k-instruct",
    "phi-3.5-mini": "microsoft/Phi-3.5-mini-instruct",
    # GPT-2
    **_family("openai-community", ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]),
    "distilgpt2": "distilbert/distilgpt2",
}

# orgs whose models need the licence accepted on the Hub before download
GATED_ORGS = ("google", "meta-llama", "mistralai")


def lookup(name: str) -> str | None:
    """The Hub id of a short name, or None."""
    return SHORT_NAMES.get(name.lower())


def close_matches(name: str, extra: tuple[str, ...] | list[str] = (), n: int = 5) -> list[str]:
    """Known names that look like ``name`` (difflib), best first; ``extra``: more candidates."""
    return difflib.get_close_matches(name.lower(), [*extra, *SHORT_NAMES], n=n, cutoff=0.6)


def is_gated(repo_id: str) -> bool:
    return repo_id.split("/")[0] in GATED_ORGS
