"""The one tolerance table: how far a baked model may be from the hooked base, by the dtype of the
baked weights. Verify (both kinds) and the tests read it here. Only floating-point tensors count:
an integer or FP8 buffer in a checkpoint says nothing about the precision of the folded weights."""

from __future__ import annotations

from collections.abc import Iterable

from .io.st_format import FLOAT_DTYPES

# max |Δlogit|, language models: the hooked base vs the checkpoint in a fresh transformers process, both
# computed in float32 whatever the checkpoint's dtype, so the difference is the rounding of the folded
# weights to it and nothing else. Real models: logits reach ~30 and the rounded weights act through
# every layer; fp32 sits at ~1e-6 relative. Half precision, measured (tests/test_e2e_half.py: detox-act
# bakes of bf16/fp16 copies of the built-in models, DEFAULT_PROMPTS + 16 greedy tokens each):
#   BF16: SmolLM2-135M 0.091, Gemma-3-270M 0.026;   F16: SmolLM2-135M 0.027, Gemma-3-270M 0.0032
# (fp16 has 3 more mantissa bits than bf16). Tolerance ≈ 5× the largest measured deviation, rounded up
# to a power of two: bf16 0.5, fp16 0.25. A fold error (a wrong scale on one weight) moves logits by
# whole units. Not computed in the checkpoint's own dtype: hooked bf16 vs hooked float32 of the same
# base already differ by up to 3.1 logits (SmolLM2) and Gemma 3 overflows to NaN in fp16.
LOGITS = {"F64": 1e-3, "F32": 1e-3, "F16": 0.25, "BF16": 0.5}
# dtypes whose rounding can flip a near-tie top-1 (verify then also compares greedy continuations)
HALF_DTYPES = ("F16", "BF16")
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
