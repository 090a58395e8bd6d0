"""Pico models from configs (hidden ≤ 64, 2 layers) for every row of the site table, a char-level
tokenizer, and random maps. Nothing is downloaded."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from actmerge.fold import capabilities
from actmerge.maps import AffineMap, MapSet
from actmerge.sites import architecture_for, resolve_sites

VOCAB = 128
# max |Δlogit| allowed between the hooked model and the baked checkpoint, by dtype
TOLERANCE = {torch.float32: 1e-4}


def pico_config(model_type: str, layers: int = 2):
    from transformers import (
        Gemma2Config,
        Gemma3Config,
        Gemma3TextConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if model_type == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if model_type == "mistral":
        return MistralConfig(**common, tie_word_embeddings=False)
    if model_type == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    if model_type == "qwen3":
        return Qwen3Config(**common, head_dim=8, tie_word_embeddings=True)
    if model_type == "phi3":
        return Phi3Config(**{**common, "num_key_value_heads": 4}, tie_word_embeddings=False)
    if model_type == "gemma2":
        return Gemma2Config(**common, head_dim=8, tie_word_embeddings=True)
    if model_type == "gemma3_text":
        return Gemma3TextConfig(**common, head_dim=8, tie_word_embeddings=True)
    if model_type == "gemma3":
        from transformers import SiglipVisionConfig

        text = Gemma3TextConfig(**common, head_dim=8)
        vision = SiglipVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
        return Gemma3Config(
            text_config=text.to_dict(),
            vision_config=vision.to_dict(),
            mm_tokens_per_image=4,
            image_token_index=VOCAB - 1,
            boi_token_index=VOCAB - 2,
            eoi_token_index=VOCAB - 3,
        )
    if model_type == "gpt2":
        return GPT2Config(
            n_embd=32,
            n_layer=layers,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=256,
            bos_token_id=1,
            eos_token_id=2,
        )
    raise ValueError(model_type)


MODEL_TYPES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "gemma3", "gpt2"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    chars = list(string.ascii_letters + string.digits + string.punctuation + " ")[: VOCAB - 4]
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    from tokenizers.processors import TemplateProcessing

    tk.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def make_pico(model_type: str, path: Path, seed: int = 0, dtype=torch.float32, layers: int = 2) -> Path:
    """Save a random pico model (+ char tokenizer) to ``path``; norms and biases randomised too.
    ``layers``: more than 2 where a shipped recipe names deeper layers (detox: 9-17)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(pico_config(model_type, layers)).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def load(path: Path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def random_maps(
    config: dict, site_names: list[str] | None = None, *, shifts: bool = True, seed: int = 0
) -> MapSet:
    """Random maps at the given sites (all by default); shifts only where they fold (with flags)."""
    arch = architecture_for(config)
    caps = {r["site"]: r for r in capabilities(arch, config)}
    g = torch.Generator().manual_seed(seed)
    maps = {}
    model = None
    for site in resolve_sites(arch, config, site_names or list(arch.sites), "all"):
        dim = _site_dim(config, site, arch)
        omega = 1 + 0.3 * torch.randn(dim, generator=g)
        foldable = shifts and not caps[site.name]["shift"].startswith("not")
        beta = 0.3 * torch.randn(dim, generator=g) if foldable else torch.zeros(dim)
        maps[site.key] = AffineMap(omega, beta)
    del model
    return MapSet(maps, base_model="pico", method="random")


def _site_dim(config: dict, site, arch) -> int:
    text = config.get("text_config", config)
    hidden = text.get("hidden_size", text.get("n_embd"))
    inter = text.get("intermediate_size") or 4 * hidden
    if site.name == "mlp_hidden":
        return inter
    if site.name == "attn_ctx":
        heads = text.get("num_attention_heads", text.get("n_head"))
        return heads * text.get("head_dim", hidden // heads)
    return hidden


def random_ids(n: int = 3, length: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB - 4, (n, length), generator=g)
