"""Tiny random diffusers pipelines and components built from configs (nothing downloaded), and
random maps for diffusion sites."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from actmerge.kinds.diffusers.plan import site_dim
from actmerge.kinds.diffusers.sites import DSite
from actmerge.kinds.diffusers.source import PipelineSource
from actmerge.maps import AffineMap, MapSet
from actmerge.tolerance import PICO_RELATIVE

CHARS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789,.'!?-")
MAX_TOKENS = 96
# max relative error between the hooked base and the reloaded baked pipeline (float32)
REL_TOL = PICO_RELATIVE  # the one tolerance table: actmerge/tolerance.py


def clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab[c] = len(vocab)
    for c in CHARS:
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_TOKENS)


def t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + c, -1.0) for c in CHARS] + [(c, -2.0) for c in CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=MAX_TOKENS)


def clip_text_encoder(vocab_size: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def t5_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(cfg)


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[8, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )


def tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=4,
        attention_head_dim=4,
    )


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Norm affines and biases away from their (1, 0) init, so that folds into them are tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or (p.dim() == 1 and name.endswith("weight")):
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def make_sd(path: Path, seed: int = 0) -> Path:
    """CLIP + UNet2DConditionModel + VAE + DDIM: a StableDiffusionPipeline of ~100k parameters."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(seed)
    tok = clip_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=randomize(clip_text_encoder(len(tok)), seed),
        tokenizer=tok,
        unet=randomize(tiny_unet(), seed + 1),
        scheduler=DDIMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            clip_sample=False,
            steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def tiny_pixart():
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=24,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )


def make_pixart(path: Path, seed: int = 0) -> Path:
    """T5 encoder + PixArtTransformer2DModel + VAE + DDIM: a PixArtAlphaPipeline."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline

    torch.manual_seed(seed)
    tok = t5_tokenizer()
    pipe = PixArtAlphaPipeline(
        tokenizer=tok,
        text_encoder=randomize(t5_encoder(len(tok)), seed),
        vae=tiny_vae(),
        transformer=randomize(tiny_pixart(), seed + 1),
        scheduler=DDIMScheduler(clip_sample=False),
    )
    pipe.save_pretrained(path)
    return path


def save_component(path: Path, pipeline_class: str, name: str, model) -> Path:
    """A pipeline directory holding one component (enough to plan and bake, not to run)."""
    model.save_pretrained(path / name)
    library = "transformers" if type(model).__module__.startswith("transformers") else "diffusers"
    index = {
        "_class_name": pipeline_class,
        "_diffusers_version": "0.42.1",
        name: [library, type(model).__name__],
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def random_maps(source: PipelineSource, sites: list[DSite], seed: int = 0, shifts: bool = True) -> MapSet:
    g = torch.Generator().manual_seed(seed)
    maps = {}
    for s in sites:
        n = site_dim(source, s)
        omega = 1.0 + 0.5 * torch.randn(n, generator=g)
        beta = 0.5 * torch.randn(n, generator=g) if shifts else torch.zeros(n)
        maps[s.key] = AffineMap(omega, beta)
    return MapSet(maps, base_model=str(source.path), method="random")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
