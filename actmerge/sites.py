"""The architecture table: where each abstract site lives and how a map there folds.

One ``Architecture`` row per family holds *everything* actmerge knows about it: the module
template of every site, the side of the module that is transformed, the fold rule, the bias
policy of every linear layer (present always / behind a config flag / never, and which runtimes
load an added bias), the tied tensors, and the pico model the tests build for each ``model_type``
(data only: a new row is tested by adding it). Nothing else in the package branches on
``model_type``.

Fold kinds (docs/design.md §4):
  rmsnorm     output of ``x̂·g``          scale → gain,  shift → consumers' biases
  rmsnorm_1p  output of ``x̂·(1+g)``      (Gemma) scale → ``s(1+g)−1``, shift → consumers' biases
  layernorm   output of ``x̂·γ+β``        scale → γ and β, shift → β
  linear_in   input of a linear          scale → weight columns, shift → own bias ``b + W c``
  linear_out  output of a linear         scale → weight rows and bias, shift → own bias
GPT-2's ``Conv1D`` stores ``[in, out]``; the linear kinds transpose for it (``Linear.conv1d``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import SiteError, UnknownArchitectureError
from .layers import parse_layers  # noqa: F401  (recipes' layer selections; diffusion/sites uses it too)

Side = Literal["input", "output"]
FoldKind = Literal["rmsnorm", "rmsnorm_1p", "layernorm", "linear_in", "linear_out"]
# "gguf": llama.cpp running a quantised GGUF written by `bake -o X.gguf` (gguf_bake.py): it loads the
# biases llama.cpp loads, and only norm gains (F32 in a GGUF) take a scale exactly.
RUNTIMES = ("transformers", "vllm", "llama.cpp", "gguf")
ALL = frozenset(RUNTIMES)

# Canonical order of sites inside one decoder layer (forward order), used by incremental fitting.
SITE_ORDER = ("attn_in", "attn_ctx", "attn_out", "attn_post", "mlp_in", "mlp_hidden", "mlp_out", "mlp_post")


@dataclass(frozen=True)
class Linear:
    """A linear layer of one decoder block (``module`` relative to the layer prefix).

    ``bias``: ``"always"`` (the architecture has it), ``"never"``, or the config flag that adds it
    (dotted for nested configs, e.g. ``text_config.attention_bias``).
    ``runtimes``: runtimes that load a *non-zero* bias here (a zero bias that a runtime rejects is
    stripped at export).
    """

    module: str
    bias: str
    runtimes: frozenset[str] = ALL
    conv1d: bool = False


@dataclass(frozen=True)
class SiteRule:
    """One abstract site: ``module`` (relative to the layer) and its transformed ``side``.

    ``consumers``: linear roles whose bias takes the shift of a norm site (``b + W c``). For
    linear sites the module itself is the consumer; ``linear`` names its role.
    """

    module: str
    side: Side
    fold: FoldKind
    consumers: tuple[str, ...] = ()
    linear: str | None = None
    about: str = ""


@dataclass(frozen=True)
class PicoConfig:
    """A tiny random model for the tests (hidden ≤ 64, 2 layers, ``PICO_VOCAB`` tokens): the
    transformers config class, by name, and its arguments. An argument that is itself a
    ``PicoConfig`` (a nested config) is passed as that config's ``to_dict()``."""

    config: str
    args: dict[str, Any]


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    layers: str  # module path of layer i, e.g. "model.layers.{i}"
    num_layers: str  # config key (dotted for nested configs)
    linears: dict[str, Linear]
    sites: dict[str, SiteRule]
    tied: tuple[tuple[str, str], ...] = ()  # (tensor, tensor) pairs tied when tie_word_embeddings
    # checkpoints written by other tools may prefix tensors differently from named_modules()
    tensor_prefixes: tuple[tuple[str, str], ...] = ()
    notes: str = ""
    # model_type → a pico model of it, built by the tests (a new row is tested by adding its pico)
    pico: dict[str, PicoConfig] = field(default_factory=dict)

    def layer_module(self, layer: int, module: str) -> str:
        return f"{self.layers.format(i=layer)}.{module}"


# --- shared fragments ------------------------------------------------------------------------

_LLAMA_SITES = {
    "attn_in": SiteRule(
        "input_layernorm", "output", "rmsnorm", ("q", "k", "v"), about="pre-attention norm output"
    ),
    "attn_ctx": SiteRule(
        "self_attn.o_proj", "input", "linear_in", linear="o", about="attention context (o_proj input)"
    ),
    "attn_out": SiteRule("self_attn.o_proj", "output", "linear_out", linear="o", about="o_proj output"),
    "mlp_in": SiteRule(
        "post_attention_layernorm", "output", "rmsnorm", ("gate", "up"), about="pre-MLP norm output"
    ),
    "mlp_hidden": SiteRule(
        "mlp.down_proj", "input", "linear_in", linear="down", about="MLP neurons (down_proj input)"
    ),
    "mlp_out": SiteRule("mlp.down_proj", "output", "linear_out", linear="down", about="down_proj output"),
}

_GEMMA_SITES = {
    "attn_in": SiteRule(
        "input_layernorm", "output", "rmsnorm_1p", ("q", "k", "v"), about="pre-attention norm output"
    ),
    "attn_ctx": SiteRule(
        "self_attn.o_proj", "input", "linear_in", linear="o", about="attention context (o_proj input)"
    ),
    "attn_post": SiteRule(
        "post_attention_layernorm",
        "output",
        "rmsnorm_1p",
        about="sandwich post-norm after attention (adds into the residual)",
    ),
    "mlp_in": SiteRule(
        "pre_feedforward_layernorm", "output", "rmsnorm_1p", ("gate", "up"), about="pre-MLP norm output"
    ),
    "mlp_hidden": SiteRule(
        "mlp.down_proj", "input", "linear_in", linear="down", about="MLP neurons (down_proj input)"
    ),
    "mlp_post": SiteRule(
        "post_feedforward_layernorm",
        "output",
        "rmsnorm_1p",
        about="sandwich post-norm after the MLP (adds into the residual)",
    ),
}


def _attn_mlp(attn: str, mlp: str, *, qkv_rt=ALL, o_rt=ALL, mlp_rt=ALL) -> dict[str, Linear]:
    return {
        "q": Linear("self_attn.q_proj", attn, qkv_rt),
        "k": Linear("self_attn.k_proj", attn, qkv_rt),
        "v": Linear("self_attn.v_proj", attn, qkv_rt),
        "o": Linear("self_attn.o_proj", attn, o_rt),
        "gate": Linear("mlp.gate_proj", mlp, mlp_rt),
        "up": Linear("mlp.up_proj", mlp, mlp_rt),
        "down": Linear("mlp.down_proj", mlp, mlp_rt),
    }


_GEMMA_LINEARS = {
    **_attn_mlp("attention_bias", "never", o_rt=frozenset({"transformers", "vllm"})),
}

_QWEN2_LINEARS = {
    "q": Linear("self_attn.q_proj", "always"),
    "k": Linear("self_attn.k_proj", "always"),
    "v": Linear("self_attn.v_proj", "always"),
    "o": Linear("self_attn.o_proj", "never"),
    "gate": Linear("mlp.gate_proj", "never"),
    "up": Linear("mlp.up_proj", "never"),
    "down": Linear("mlp.down_proj", "never"),
}

_TIED_LLAMA = (("lm_head.weight", "model.embed_tokens.weight"),)

# --- pico models (tests) ---------------------------------------------------------------------

PICO_VOCAB = 128
_PICO = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=PICO_VOCAB,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _pico(config: str, **args: Any) -> PicoConfig:
    return PicoConfig(config, {**_PICO, **args})


_PICO_GEMMA3_VISION = PicoConfig(
    "SiglipVisionConfig",
    dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    ),
)

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        "llama",
        ("llama",),
        "model.layers.{i}",
        "num_hidden_layers",
        _attn_mlp("attention_bias", "mlp_bias"),
        _LLAMA_SITES,
        _TIED_LLAMA,
        notes="attention_bias adds q,k,v,o biases; mlp_bias adds gate,up,down biases.",
        pico={"llama": _pico("LlamaConfig", tie_word_embeddings=False)},
    ),
    Architecture(
        "mistral",
        ("mistral",),
        "model.layers.{i}",
        "num_hidden_layers",
        _attn_mlp("never", "never"),
        _LLAMA_SITES,
        _TIED_LLAMA,
        notes="No bias flags: transformers drops extra biases, so shifts cannot fold (scales can).",
        pico={"mistral": _pico("MistralConfig", tie_word_embeddings=False)},
    ),
    Architecture(
        "qwen2",
        ("qwen2",),
        "model.layers.{i}",
        "num_hidden_layers",
        _QWEN2_LINEARS,
        _LLAMA_SITES,
        _TIED_LLAMA,
        notes="q,k,v always biased: attn_in shifts fold with no config change.",
        pico={"qwen2": _pico("Qwen2Config", tie_word_embeddings=True)},
    ),
    Architecture(
        "qwen3",
        ("qwen3",),
        "model.layers.{i}",
        "num_hidden_layers",
        _attn_mlp("attention_bias", "never", o_rt=frozenset({"transformers"})),
        _LLAMA_SITES,
        _TIED_LLAMA,
        notes="attention_bias adds q,k,v,o biases; vLLM drops and llama.cpp rejects an o_proj bias.",
        pico={"qwen3": _pico("Qwen3Config", head_dim=8, tie_word_embeddings=True)},
    ),
    Architecture(
        "phi3",
        ("phi3",),
        "model.layers.{i}",
        "num_hidden_layers",
        {
            "qkv": Linear("self_attn.qkv_proj", "never"),
            "o": Linear("self_attn.o_proj", "never"),
            "gate_up": Linear("mlp.gate_up_proj", "never"),
            "down": Linear("mlp.down_proj", "never"),
        },
        {
            **_LLAMA_SITES,
            "attn_in": SiteRule(
                "input_layernorm", "output", "rmsnorm", ("qkv",), about="pre-attention norm output"
            ),
            "mlp_in": SiteRule(
                "post_attention_layernorm", "output", "rmsnorm", ("gate_up",), about="pre-MLP norm output"
            ),
        },
        _TIED_LLAMA,
        notes="Fused qkv / gate_up projections, no bias flags: shifts cannot fold (scales can).",
        pico={"phi3": _pico("Phi3Config", num_key_value_heads=4, tie_word_embeddings=False)},
    ),
    Architecture(
        "gemma",
        ("gemma2", "gemma3_text"),
        "model.layers.{i}",
        "num_hidden_layers",
        _GEMMA_LINEARS,
        _GEMMA_SITES,
        _TIED_LLAMA,
        notes="Norms compute x̂·(1+g). Sandwich post-norms have no bias to take a shift.",
        pico={
            "gemma2": _pico("Gemma2Config", head_dim=8, tie_word_embeddings=True),
            "gemma3_text": _pico("Gemma3TextConfig", head_dim=8, tie_word_embeddings=True),
        },
    ),
    Architecture(
        "gemma3",
        ("gemma3",),
        "model.language_model.layers.{i}",
        "text_config.num_hidden_layers",
        _attn_mlp("text_config.attention_bias", "never", o_rt=frozenset({"transformers", "vllm"})),
        _GEMMA_SITES,
        (("lm_head.weight", "model.language_model.embed_tokens.weight"),),
        tensor_prefixes=(("model.language_model.", "language_model.model."),),
        notes="Multimodal Gemma 3: the text decoder only.",
        pico={
            "gemma3": PicoConfig(
                "Gemma3Config",
                dict(
                    text_config=_pico("Gemma3TextConfig", head_dim=8),
                    vision_config=_PICO_GEMMA3_VISION,
                    mm_tokens_per_image=4,
                    image_token_index=PICO_VOCAB - 1,
                    boi_token_index=PICO_VOCAB - 2,
                    eoi_token_index=PICO_VOCAB - 3,
                ),
            )
        },
    ),
    Architecture(
        "gpt2",
        ("gpt2",),
        "transformer.h.{i}",
        "n_layer",
        {
            "c_attn": Linear("attn.c_attn", "always", conv1d=True),
            "attn_proj": Linear("attn.c_proj", "always", conv1d=True),
            "c_fc": Linear("mlp.c_fc", "always", conv1d=True),
            "mlp_proj": Linear("mlp.c_proj", "always", conv1d=True),
        },
        {
            "attn_in": SiteRule("ln_1", "output", "layernorm", about="pre-attention LayerNorm output"),
            "attn_ctx": SiteRule(
                "attn.c_proj",
                "input",
                "linear_in",
                linear="attn_proj",
                about="attention context (c_proj input)",
            ),
            "attn_out": SiteRule(
                "attn.c_proj", "output", "linear_out", linear="attn_proj", about="attention c_proj output"
            ),
            "mlp_in": SiteRule("ln_2", "output", "layernorm", about="pre-MLP LayerNorm output"),
            "mlp_hidden": SiteRule(
                "mlp.c_proj", "input", "linear_in", linear="mlp_proj", about="MLP neurons (c_proj input)"
            ),
            "mlp_out": SiteRule(
                "mlp.c_proj", "output", "linear_out", linear="mlp_proj", about="MLP c_proj output"
            ),
        },
        (("lm_head.weight", "transformer.wte.weight"),),
        tensor_prefixes=(("transformer.", ""),),
        notes="Every linear (Conv1D, [in, out]) and LayerNorm is biased: everything folds.",
        pico={
            "gpt2": PicoConfig(
                "GPT2Config",
                dict(
                    n_embd=32,
                    n_layer=2,
                    n_head=4,
                    vocab_size=PICO_VOCAB,
                    n_positions=256,
                    bos_token_id=1,
                    eos_token_id=2,
                ),
            )
        },
    ),
)


def architecture_for(config: Any) -> Architecture:
    """The table row for a transformers config (or a ``model_type`` string)."""
    if isinstance(config, str):
        model_type = config
    elif isinstance(config, dict):
        model_type = config.get("model_type")
    else:
        model_type = getattr(config, "model_type", None)
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    known = ", ".join(t for a in ARCHITECTURES for t in a.model_types)
    raise UnknownArchitectureError(
        f"model_type {model_type!r} has no row in actmerge's site table (known: {known}). "
        "Add a row to actmerge/sites.py ARCHITECTURES, or open an issue with the model's config.json."
    )


def num_layers(arch: Architecture, config: Any) -> int:
    value: Any = config
    for key in arch.num_layers.split("."):
        value = value[key] if isinstance(value, dict) else getattr(value, key)
    return int(value)


@dataclass(frozen=True)
class Site:
    """A resolved site: one module path and side, with the rule that folds it."""

    name: str  # abstract site name
    layer: int
    module: str  # full path from model.named_modules()
    side: Side
    rule: SiteRule = field(repr=False)

    @property
    def key(self) -> str:
        return f"{self.module}:{self.side}"

    @property
    def order(self) -> tuple[int, int]:
        return (self.layer, SITE_ORDER.index(self.name))


def resolve_sites(
    arch: Architecture, config: Any, names: list[str], layers: str | list[int] | None
) -> list[Site]:
    """Abstract site names × layer selection → concrete sites, in forward order."""
    n = num_layers(arch, config)
    out = []
    for name in names:
        if name not in arch.sites:
            raise SiteError(
                f"site {name!r} does not exist for {arch.name}; available: {', '.join(arch.sites)}. "
                "Run `actmerge sites MODEL` to see them."
            )
        rule = arch.sites[name]
        for layer in parse_layers(layers, n):
            out.append(Site(name, layer, arch.layer_module(layer, rule.module), rule.side, rule))
    return sorted(out, key=lambda s: s.order)


def site_for_key(arch: Architecture, config: Any, key: str) -> Site:
    """Match a raw ``module:side`` key (as in maps files and expert recipes) to a table rule."""
    module, _, side = key.rpartition(":")
    if side not in ("input", "output"):
        raise SiteError(f"{key!r}: expected '<module>:<input|output>'.")
    for layer in range(num_layers(arch, config)):
        for name, rule in arch.sites.items():
            if rule.side == side and arch.layer_module(layer, rule.module) == module:
                return Site(name, layer, module, side, rule)
    raise SiteError(
        f"{key!r} is not a site actmerge knows how to fold for {arch.name}: raw module names must be "
        f"one of the table's modules ({', '.join(f'{r.module}:{r.side}' for r in arch.sites.values())}) "
        f"under {arch.layers}."
    )
