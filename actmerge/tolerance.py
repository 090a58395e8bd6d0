"""The one tolerance table: how far a baked model may be from the hooked base, by the dtype of the
baked weights. Verify (both kinds) and the tests read it here. Only floating-point tensors count:
an integer or FP8 buffer in a checkpoint says nothing about the precision of the folded weights."""

from __future__ import annotations

from collections.abc import Iterable

from .io.st_format import FLOAT_DTYPES

# max |Δlogit|, language models in a fresh transformers process (real models: logits reach ~30, and
# the folded weights round through many layers; fp32 sits at ~1e-6 relative)
LOGITS = {"F64": 1e-3, "F32": 1e-3, "F16": 0.25, "BF16": 0.5}
# max |Δ| / max |reference| per output tensor, diffusers pipelines (text encoders, denoiser, latents)
PIPELINE_RELATIVE = {"F64": 1e-4, "F32": 1e-4, "F16": 1e-2, "BF16": 5e-2}
# max |Δlogit| between hooked and baked pico test models (fp32, logits ~1): tighter than real models
PICO_LOGITS = 1e-4
PICO_RELATIVE = 1e-4
# max |Δlogit| hooked (transformers) vs a pico GGUF in llama.cpp: ggml's table-driven GELU and f32 kernels
LLAMACPP_PICO = 1e-3


def for_dtypes(table: dict[str, float], dtypes: Iterable[str]) -> float:
    """The loosest tolerance among the checkpoint's floating-point dtypes (fp32 when it has none)."""
    floats = [d for d in set(dtypes) if d in FLOAT_DTYPES]
    return max((table[d] for d in floats), default=table["F32"])
