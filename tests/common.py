"""Pico models from configs (hidden ≤ 64, 2 layers) for every row of the site table, a char-level
tokenizer, and random maps. Nothing is downloaded."""

from __future__ import annotations

import importlib.util
import string
import sys
import zlib
from pathlib import Path
from types import ModuleType

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from actmerge.fold import capabilities
from actmerge.maps import AffineMap, MapSet
from actmerge.sites import ARCHITECTURES, PICO_VOCAB, PicoConfig, architecture_for, resolve_sites
from actmerge.tolerance import PICO_LOGITS

VOCAB = PICO_VOCAB
# max |Δlogit| allowed between the hooked model and the baked checkpoint, by dtype
TOLERANCE = {torch.float32: PICO_LOGITS}  # the one tolerance table: actmerge/tolerance.py


def pico_config(model_type: str, layers: int = 2):
    """The transformers config of the pico model that ``model_type``'s table row declares;
    ``layers``: more than 2 where a shipped recipe names deeper layers (detox: 9-17)."""
    pico = architecture_for(model_type).pico.get(model_type)
    if pico is None:
        raise ValueError(
            f"the {model_type!r} row of actmerge/sites.py has no pico model: add one to its `pico`"
        )
    config = _build(pico)
    if layers != 2:
        text = getattr(config, "text_config", None) or config
        for key in ("num_hidden_layers", "n_layer"):
            if hasattr(text, key):
                setattr(text, key, layers)
        if hasattr(text, "layer_types") and text.layer_types is not None:
            text.layer_types = [text.layer_types[i % len(text.layer_types)] for i in range(layers)]
    return config


def _build(pico: PicoConfig):
    import transformers

    args = {k: _build(v).to_dict() if isinstance(v, PicoConfig) else v for k, v in pico.args.items()}
    return getattr(transformers, pico.config)(**args)


# every model_type of every row, in table order (test_fold_archs seeds pico models by position)
MODEL_TYPES = [t for arch in ARCHITECTURES for t in arch.model_types]


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


def stable_seed(name: str) -> int:
    """A seed derived from a name that is the same in every run (``hash()`` of a str is salted per
    process: a failure seeded with it cannot be reproduced)."""
    return zlib.crc32(name.encode()) % 1000


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


# a pico fitting setup: 12 source / 12 target sentences and a recipe over three Llama-style sites
PICO_SENTENCES = [f"sentence {i} says{'!' * (i % 5)} something" for i in range(24)]
PICO_RECIPE = """
name: {name}
method: {method}
sites:
  - site: [attn_in, attn_ctx, mlp_hidden]
    layers: all
source: src.txt
target: tgt.txt
batch_size: 8
min_sentences: 12
"""


def write_pico_fit_data(root: Path) -> None:
    """The source and target sentence files that ``PICO_RECIPE`` names, in ``root``."""
    (root / "src.txt").write_text("\n".join(PICO_SENTENCES[:12]))
    (root / "tgt.txt").write_text("\n".join(PICO_SENTENCES[12:]))


def write_cli_setup(root: Path, recipe: str) -> Path:
    """The CLI tests' pico setup in ``root``: a pico Llama (returned), 20 source and 20 target
    sentences (``src.txt``, ``tgt.txt``) and ``recipe`` beside them as ``r.yaml``."""
    model = make_pico("llama", root / "llama")
    (root / "src.txt").write_text("\n".join(f"bad words number {i} are here!!" for i in range(20)))
    (root / "tgt.txt").write_text("\n".join(f"kind text {i}, nice and calm." for i in range(20)))
    (root / "r.yaml").write_text(recipe)
    return model


def bench_module(name: str) -> ModuleType:
    """``bench/<name>.py`` as a module (bench is not a package), e.g. ``bench_module("heldout")``."""
    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module
