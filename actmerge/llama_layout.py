"""Mistral in the Llama layout (``bake --as-llama``): shifts fold into biases that transformers,
vLLM and llama.cpp all load."""

from __future__ import annotations

import json
from dataclasses import dataclass

from .errors import ExportError
from .models import ModelSource

# config keys written over a Mistral config.json by `bake --as-llama` (the fold plan adds the bias flags)
LLAMA_LAYOUT_PATCH = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "sliding_window": None}


def as_llama_config(config: dict) -> dict:
    """A Mistral config in the Llama layout, where ``attention_bias``/``mlp_bias`` give shifts a home.

    Mistral is Llama plus a sliding window; transformers (and vLLM) drop biases a Mistral checkpoint
    carries, Llama loads them, and llama.cpp converts both to its ``llama`` architecture. The layouts
    compute the same function only while the window never binds: refused when ``sliding_window`` is
    set below ``max_position_embeddings``."""
    if config.get("model_type") != "mistral":
        raise ExportError(
            f"--as-llama converts Mistral checkpoints (model_type 'mistral'), not {config.get('model_type')!r}."
        )
    window, max_pos = config.get("sliding_window"), config.get("max_position_embeddings")
    if window is not None and (max_pos is None or window < max_pos):
        raise ExportError(
            f"sliding_window={window} < max_position_embeddings={max_pos}: Mistral attends to the last "
            f"{window} tokens only and Llama has no sliding window, so the Llama layout would compute "
            "another function on long inputs. --as-llama needs sliding_window null or ≥ the context."
        )
    out = {k: v for k, v in config.items() if k != "sliding_window"}
    out.update({k: v for k, v in LLAMA_LAYOUT_PATCH.items() if v is not None})
    out.setdefault("attention_bias", False)
    out.setdefault("mlp_bias", False)
    return out


@dataclass(frozen=True)
class LlamaLayout(ModelSource):
    """A Mistral source planned as Llama: fitting and hooks still load the checkpoint as it is."""

    @property
    def config(self) -> dict:
        return as_llama_config(json.loads((self.path / "config.json").read_text()))
