"""The diffusion site table: one row per component class (text encoders, UNets, DiTs) and one row
per pipeline class (where a text encoder's output goes). Data only; docs/design.md §8.

Fold kinds (all exact, per element, docs/design.md §4):
  layernorm   output of a LayerNorm / GroupNorm with affine ``x̂·γ+β``: γ' = s⊙γ, β' = s⊙β + c.
              On a 4-D feature map ``[B, C, H, W]`` the map is per channel (axis 1): GroupNorm's affine
              is per channel, so a per-channel map folds exactly; a per-pixel (C×H×W) map cannot.
  rmsnorm     output of an RMSNorm ``x̂·g`` (T5): g' = s⊙g; the shift goes into the biases of
              ``consumers`` or, at a text encoder's final norm, across components into the denoiser
              layer that reads the text (``Pipeline.text_into``).
  linear_in   the activation that ``consumers`` (linears) read: W' = W·diag(s), b' = b + W c.
              Hooking an attention module's input covers q, k and v at once.
  linear_out  output of a biased linear: W' = diag(s)·W, b' = s⊙b + c.
A shift folds only into a bias that exists in the checkpoint: diffusers and transformers drop a
bias that the architecture does not declare, so actmerge never adds one here.

Module paths are ``named_modules()`` paths inside the component. ``block`` names a kind of
repeated block (regex over module paths); the recipe's ``layers:`` selects blocks of that kind in
forward order (UNet: down blocks, mid block, up blocks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Side = Literal["input", "output"]
Fold = Literal["layernorm", "rmsnorm", "linear_in", "linear_out"]
Role = Literal["text_encoder", "denoiser"]

# a UNet's stages in forward order: blocks are numbered down → mid → up
UNET_STAGES = ("down_blocks", "mid_block", "up_blocks")


@dataclass(frozen=True)
class Rule:
    """One abstract site: the ``side`` of ``module`` (relative to a block of kind ``block``, or
    absolute when ``block`` is None), and how a map there folds."""

    module: str
    side: Side
    fold: Fold
    block: str | None = None
    consumers: tuple[str, ...] = ()  # linear_in: the linears that read it; rmsnorm: shift homes
    text_output: bool = False  # the text encoder's output: a shift may go into the denoiser
    spatial: bool = False  # a 4-D feature map [B, C, H, W]: maps are per channel
    about: str = ""


@dataclass(frozen=True)
class Component:
    name: str
    classes: tuple[str, ...]  # class names as written in model_index.json
    role: Role
    blocks: dict[str, str]  # block kind → regex of a block's module path
    sites: dict[str, Rule]
    refused: dict[str, str] = field(default_factory=dict)  # site name → why not, and what to use
    # module paths and tensor names may differ by a prefix (transformers 5 builds CLIPTextModel
    # without ``text_model.``, older checkpoints name its tensors with it): pairs of prefixes that
    # are tried both ways after the exact name
    tensor_prefixes: tuple[tuple[str, str], ...] = ()
    notes: str = ""


@dataclass(frozen=True)
class Pipeline:
    """Where each text encoder's output goes: (denoiser component, linear that reads it), or the
    reason a shift on that output cannot fold there."""

    classes: tuple[str, ...]
    text_into: dict[str, tuple[str, str] | str]


# --- text encoders ---------------------------------------------------------------------------

_CLIP_SITES = {
    "text_attn_in": Rule(
        "layer_norm1", "output", "layernorm", "layer", about="pre-attention LayerNorm output"
    ),
    "text_attn_ctx": Rule(
        "self_attn.out_proj", "input", "linear_in", "layer", ("self_attn.out_proj",), about="out_proj input"
    ),
    "text_attn_out": Rule("self_attn.out_proj", "output", "linear_out", "layer", about="out_proj output"),
    "text_mlp_in": Rule("layer_norm2", "output", "layernorm", "layer", about="pre-MLP LayerNorm output"),
    "text_mlp_hidden": Rule(
        "mlp.fc2", "input", "linear_in", "layer", ("mlp.fc2",), about="MLP neurons (fc2 input)"
    ),
    "text_mlp_out": Rule("mlp.fc2", "output", "linear_out", "layer", about="fc2 output"),
    "text_final": Rule(
        "final_layer_norm",
        "output",
        "layernorm",
        text_output=True,
        about="final LayerNorm: the prompt embedding of SD 1.x/2.x (SDXL reads the penultimate layer "
        "and only pools this one)",
    ),
}

_T5_SITES = {
    "text_attn_in": Rule(
        "layer.0.layer_norm",
        "output",
        "rmsnorm",
        "layer",
        ("layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v"),
        about="pre-attention RMSNorm output (q, k, v have no bias: scale only)",
    ),
    "text_attn_ctx": Rule(
        "layer.0.SelfAttention.o",
        "input",
        "linear_in",
        "layer",
        ("layer.0.SelfAttention.o",),
        about="attention output projection input (no bias: scale only)",
    ),
    "text_mlp_in": Rule(
        "layer.1.layer_norm",
        "output",
        "rmsnorm",
        "layer",
        ("layer.1.DenseReluDense.wi", "layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_1"),
        about="pre-MLP RMSNorm output (no bias: scale only)",
    ),
    "text_mlp_hidden": Rule(
        "layer.1.DenseReluDense.wo",
        "input",
        "linear_in",
        "layer",
        ("layer.1.DenseReluDense.wo",),
        about="MLP neurons (wo input; no bias: scale only)",
    ),
    "text_final": Rule(
        "encoder.final_layer_norm",
        "output",
        "rmsnorm",
        text_output=True,
        about="final RMSNorm (the prompt embedding): scale → gain, shift → the denoiser's text input layer",
    ),
}

# --- denoisers -------------------------------------------------------------------------------

_UNET_STAGE = r"(?:down_blocks\.\d+|mid_block|up_blocks\.\d+)"

_UNET_SITES = {
    "unet_attn_in": Rule("norm1", "output", "layernorm", "tblock", about="self-attention LayerNorm output"),
    "unet_attn_ctx": Rule(
        "attn1.to_out.0",
        "input",
        "linear_in",
        "tblock",
        ("attn1.to_out.0",),
        about="self-attention to_out input",
    ),
    "unet_attn_out": Rule(
        "attn1.to_out.0", "output", "linear_out", "tblock", about="self-attention to_out output"
    ),
    "unet_cross_in": Rule(
        "norm2", "output", "layernorm", "tblock", about="cross-attention LayerNorm output (queries)"
    ),
    "unet_cross_ctx": Rule(
        "attn2.to_out.0",
        "input",
        "linear_in",
        "tblock",
        ("attn2.to_out.0",),
        about="cross-attention to_out input",
    ),
    "unet_cross_out": Rule(
        "attn2.to_out.0", "output", "linear_out", "tblock", about="cross-attention to_out output"
    ),
    "unet_ff_in": Rule("norm3", "output", "layernorm", "tblock", about="feed-forward LayerNorm output"),
    "unet_ff_hidden": Rule(
        "ff.net.2",
        "input",
        "linear_in",
        "tblock",
        ("ff.net.2",),
        about="feed-forward neurons (ff.net.2 input)",
    ),
    "unet_ff_out": Rule("ff.net.2", "output", "linear_out", "tblock", about="feed-forward output"),
    "unet_resnet_norm1": Rule(
        "norm1",
        "output",
        "layernorm",
        "resnet",
        spatial=True,
        about="ResnetBlock2D first GroupNorm output (per channel)",
    ),
    "unet_resnet_norm2": Rule(
        "norm2",
        "output",
        "layernorm",
        "resnet",
        spatial=True,
        about="ResnetBlock2D second GroupNorm output (per channel)",
    ),
    "unet_proj_norm": Rule(
        "norm",
        "output",
        "layernorm",
        "attention",
        spatial=True,
        about="Transformer2DModel GroupNorm before proj_in (per channel)",
    ),
}

_RESIDUAL = (
    "a block output is the residual stream: the next block normalises it without affine parameters and "
    "timestep-gated residual adds carry it on, so no weight holds a per-channel map there (ml-act's FLUX "
    "default). Use the block's biased consumers instead: dit_attn_in, dit_ff_in (and dit_single_in on FLUX)."
)
_DIT_BLOCK = r"transformer_blocks\.\d+"


def _dual_stream(image_about: str) -> dict[str, Rule]:
    """SD3 / FLUX joint blocks: image- and text-stream attention inputs, plus the common DiT sites."""
    return {
        "dit_attn_in": Rule(
            "norm1", "output", "linear_in", "block", tuple(f"attn.{p}" for p in _QKV), about=image_about
        ),
        "dit_context_attn_in": Rule(
            "norm1_context",
            "output",
            "linear_in",
            "block",
            tuple(f"attn.{p}" for p in _ADDED_QKV),
            about="text-stream attention input → biased add_q/k/v_proj",
        ),
        **_dit_common("attn"),
    }


def _dit_common(attn: str) -> dict[str, Rule]:
    return {
        "dit_attn_ctx": Rule(
            f"{attn}.to_out.0",
            "input",
            "linear_in",
            "block",
            (f"{attn}.to_out.0",),
            about="attention to_out input",
        ),
        "dit_attn_out": Rule(
            f"{attn}.to_out.0", "output", "linear_out", "block", about="attention to_out output"
        ),
        "dit_ff_in": Rule(
            "ff",
            "input",
            "linear_in",
            "block",
            ("ff.net.0.proj",),
            about="feed-forward input (modulated norm)",
        ),
        "dit_ff_hidden": Rule(
            "ff.net.2",
            "input",
            "linear_in",
            "block",
            ("ff.net.2",),
            about="feed-forward neurons (ff.net.2 input)",
        ),
        "dit_ff_out": Rule("ff.net.2", "output", "linear_out", "block", about="feed-forward output"),
    }


_QKV = ("to_q", "to_k", "to_v")
_ADDED_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")

COMPONENTS: tuple[Component, ...] = (
    Component(
        "clip",
        ("CLIPTextModel", "CLIPTextModelWithProjection"),
        "text_encoder",
        {"layer": r"(?:text_model\.)?encoder\.layers\.\d+"},
        _CLIP_SITES,
        tensor_prefixes=(("text_model.", ""),),
        notes="Every LayerNorm and linear is biased: scales and shifts fold everywhere.",
    ),
    Component(
        "t5",
        ("T5EncoderModel",),
        "text_encoder",
        {"layer": r"encoder\.block\.\d+"},
        _T5_SITES,
        notes="No biases anywhere: scales fold into RMSNorm gains and weight columns; a shift on the "
        "final output folds into the denoiser's text input layer (pipeline table).",
    ),
    Component(
        "unet",
        ("UNet2DConditionModel",),
        "denoiser",
        {
            "tblock": rf"{_UNET_STAGE}\.attentions\.\d+\.transformer_blocks\.\d+",
            "resnet": rf"{_UNET_STAGE}\.resnets\.\d+",
            "attention": rf"{_UNET_STAGE}\.attentions\.\d+",
        },
        _UNET_SITES,
        notes="LayerNorms and GroupNorms carry affine parameters: maps at their outputs fold exactly. "
        "SD's q/k/v have no bias (attention_bias: false), so shifts go to norms and to_out/ff.",
    ),
    Component(
        "pixart",
        ("PixArtTransformer2DModel",),
        "denoiser",
        {"block": _DIT_BLOCK},
        {
            "dit_attn_in": Rule(
                "attn1",
                "input",
                "linear_in",
                "block",
                tuple(f"attn1.{p}" for p in _QKV),
                about="self-attention input (modulated norm) → biased q, k, v",
            ),
            "dit_cross_in": Rule(
                "attn2",
                "input",
                "linear_in",
                "block",
                ("attn2.to_q",),
                about="cross-attention query input → to_q",
            ),
            **_dit_common("attn1"),
            "dit_text_in": Rule(
                "caption_projection",
                "input",
                "linear_in",
                consumers=("caption_projection.linear_1",),
                about="the T5 prompt embedding as the DiT reads it (caption_projection.linear_1 input)",
            ),
        },
        refused={"dit_block_out": _RESIDUAL},
        notes="norm1/norm2 have no affine parameters (adaLN-single): maps sit at the biased linears' inputs.",
    ),
    Component(
        "sd3",
        ("SD3Transformer2DModel",),
        "denoiser",
        {"block": _DIT_BLOCK},
        {
            **_dual_stream("image-stream attention input (AdaLayerNormZero output) → biased q, k, v"),
            "dit_context_ff_in": Rule(
                "ff_context",
                "input",
                "linear_in",
                "block",
                ("ff_context.net.0.proj",),
                about="text-stream feed-forward input (absent in the last block)",
            ),
            "dit_text_in": Rule(
                "context_embedder",
                "input",
                "linear_in",
                consumers=("context_embedder",),
                about="the joint CLIP+T5 text sequence as the DiT reads it",
            ),
        },
        refused={"dit_block_out": _RESIDUAL},
    ),
    Component(
        "flux",
        ("FluxTransformer2DModel",),
        "denoiser",
        {"block": _DIT_BLOCK, "single": r"single_transformer_blocks\.\d+"},
        {
            **_dual_stream("image-stream attention input → biased q, k, v"),
            "dit_single_in": Rule(
                "norm",
                "output",
                "linear_in",
                "single",
                (*(f"attn.{p}" for p in _QKV), "proj_mlp"),
                about="single-stream block input → biased q, k, v and proj_mlp",
            ),
            "dit_text_in": Rule(
                "context_embedder",
                "input",
                "linear_in",
                consumers=("context_embedder",),
                about="the T5 prompt embedding as the DiT reads it",
            ),
        },
        refused={"dit_block_out": _RESIDUAL, "dit_single_out": _RESIDUAL},
    ),
)

# 4-D feature maps [B, C, H, W]: how a map may act on them (recipe `diffusion.feature_maps`)
FEATURE_MAPS = {
    "per_channel": "",
    "per_pixel": "a per-pixel (C×H×W) map has one scale and shift per position, but a GroupNorm or conv "
    "holds one affine per channel (and a per-pixel map would tie the checkpoint to one resolution). "
    "Use feature_maps: per_channel (each pixel is a sample of its channel's distribution).",
    "spatial_mean": "ml-act's 4-D transport maps each channel's spatial mean, not each element: the map's "
    "input depends on the whole feature map and no weight can hold it. Use feature_maps: per_channel.",
}

_SD3_T5 = (
    "SD3 concatenates the CLIP and T5 token sequences before context_embedder, so a bias there would "
    "shift the CLIP tokens too. Fit scale-only maps at text_final (fit_shift: false), or steer inside "
    "the DiT (dit_text_in takes the shift of the joint sequence)."
)

PIPELINES: tuple[Pipeline, ...] = (
    Pipeline(("StableDiffusionPipeline", "StableDiffusionXLPipeline"), {}),
    Pipeline(
        ("PixArtAlphaPipeline", "PixArtSigmaPipeline"),
        {"text_encoder": ("transformer", "caption_projection.linear_1")},
    ),
    Pipeline(("StableDiffusion3Pipeline",), {"text_encoder_3": _SD3_T5}),
    Pipeline(("FluxPipeline",), {"text_encoder_2": ("transformer", "context_embedder")}),
)


def component_for(cls: str) -> Component | None:
    return next((c for c in COMPONENTS if cls in c.classes), None)


def pipeline_for(cls: str) -> Pipeline | None:
    return next((p for p in PIPELINES if cls in p.classes), None)


def known_classes() -> list[str]:
    return [k for c in COMPONENTS for k in c.classes]
