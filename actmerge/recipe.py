"""Recipes: a validated, frozen description of what to steer and how (YAML, unknown keys rejected)."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import RecipeError

METHODS = ("linear_act", "mean_act", "gaussian_act", "lineas")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiteSpec(_Strict):
    """Abstract site names (DESIGN.md §3) with a layer selection: 'all', '2-5', '0,3,7', '-4:'."""

    site: str | list[str]
    layers: str | list[int] = "all"

    @property
    def names(self) -> list[str]:
        return [self.site] if isinstance(self.site, str) else list(self.site)


class LineasOptions(_Strict):
    """LinEAS optimisation settings (DESIGN.md §2); defaults are the paper's."""

    steps: int = Field(1000, gt=0)
    lr: float = Field(1e-3, gt=0)
    lr_min: float = Field(1e-6, ge=0)
    batch: int = Field(32, gt=1, description="source sentences (and target samples) per step")
    l1: float = Field(0.0, ge=0, description="sparsity: L1 on (ω−1) and β (neuron selection)")
    group: float = Field(
        0.0, ge=0, description="sparsity: group-L2 per site, threshold ∝ √d (site selection)"
    )
    # ml-lineas (apply_sparse_group_lasso) shrinks ω−1 and β as two separate groups per site: with
    # trainable shifts a site can keep its scales and lose its shifts. "joint" (actmerge's variant)
    # shrinks [ω−1, β] as one group per site. Identical when β is frozen (fit_shift: false, shifts
    # that cannot fold).
    group_mode: Literal["separate", "joint"] = Field(
        "separate", description="group-L2 groups per site: ω−1 and β separately (reference) or jointly"
    )
    # Per-neuron W2 divided by the target activations' variance (+1e-6) so that large neurons (Gemma's
    # post-norms, std up to ~60) do not swamp the loss; "none" is the reference's raw W2.
    # "target_std" is the former name of "target_var" (it always divided by the variance).
    loss_norm: Literal["none", "target_var"] = "none"
    param: Literal["linear", "log"] = Field(
        "linear", description="learn ω directly (linear) or as exp(θ) (log: ω stays positive)"
    )

    @field_validator("loss_norm", mode="before")
    @classmethod
    def _loss_norm_alias(cls, v):
        if v == "target_std":
            warnings.warn(
                "lineas.loss_norm: target_std is deprecated (it divides by the target's variance, "
                "not its std): write loss_norm: target_var, which computes the same.",
                FutureWarning,
                stacklevel=2,
            )
            return "target_var"
        return v


class Recipe(_Strict):
    name: str = Field(description="short name, used in output names and model-card tags")
    description: str = ""
    method: Literal["linear_act", "mean_act", "gaussian_act", "lineas"] = "linear_act"
    lineas: LineasOptions = Field(default_factory=LineasOptions, description="settings for method: lineas")
    fold_aware: bool = Field(True, description="lineas: freeze the shifts that the fold plan cannot bake")
    allow_config_change: bool = Field(
        True, description="fold-aware: may shifts use config flags (attention_bias)?"
    )
    targets: list[Literal["transformers", "vllm", "llama.cpp"]] = Field(
        default_factory=list, description="fold-aware: runtimes the bake must load in"
    )
    sites: list[SiteSpec | str] = Field(default_factory=list, description="abstract sites (+layers)")
    modules: list[str] = Field(default_factory=list, description="raw '<module>:<input|output>' keys")
    source: Path = Field(description="sentences to steer away from (txt: one per line, or jsonl)")
    target: Path = Field(description="sentences to steer towards")
    eval_prompts: Path | None = Field(
        None, description="held-out prompts for `actmerge eval` (never fitted on)"
    )
    neutral_text: Path | None = Field(None, description="neutral text for perplexity")
    metrics: list[Literal["toxicity", "concept", "perplexity", "similarity"]] = ["toxicity", "perplexity"]
    scorer: str = Field("profanity", description="toxicity scorer: 'profanity' or 'hf:<model id>'")
    keywords: Path | None = Field(
        None, description="concept keywords file (one per line) for the concept metric"
    )
    eval_max_new_tokens: int = Field(24, gt=0)
    text_field: str = "text"
    max_sentences: int = Field(256, gt=0)
    max_tokens: int = Field(128, gt=1)
    batch_size: int = Field(16, gt=0)
    pooling: Literal["mean", "last"] = "mean"
    # Which tokens the mean pools. "include" (reference, ml-act act/hooks/pooling_ops.py): every real
    # token, BOS included; only padding is masked. "exclude" (actmerge's variant): special tokens
    # (BOS) are left out, so the pooled vector is the sentence's own content; on Gemma-3 the BOS
    # activation is large at the post-norms and moves the mean by 2-83 %. Former key:
    # skip_special_tokens (true = exclude), still read with a deprecation message.
    pooling_special_tokens: Literal["include", "exclude"] = Field(
        "include", description="mean pooling: keep special tokens (BOS) in the mean (reference) or not"
    )
    # Which rows the statistics use. "balanced" (reference, label_src_dst_subsets(balanced=True)): a
    # seeded equal-count subsample of source and target, for every method, and the clamp support
    # (hooks.steer's ml-act variant) from that source subset. "all": mean_act/gaussian_act use every
    # row and the support all source rows (linear_act pairs by rank, so it always balances).
    sample: Literal["balanced", "all"] = Field(
        "balanced",
        description="statistics and clamp support from an equal-count subsample (reference) or all rows",
    )
    # Neurons the estimator cannot or should not move. "skip" (reference): linear_act leaves a neuron
    # with a constant source untouched (ml-act's ω explodes there and its q_0_100 clamp then moves no
    # value); gaussian_act/mean_act leave neurons with std <= 1e-4 on either side untouched (ml-act's
    # std_eps). "shift" (actmerge's variant): a neuron whose source std is < 1e-6 x its scale gets
    # ω = 1 and β = mean difference (linear_act, gaussian_act); mean_act moves every neuron.
    degenerate_neurons: Literal["skip", "shift"] = Field(
        "skip", description="degenerate neurons: leave untouched (reference) or shift-only"
    )
    incremental: bool = False
    # Incremental fitting (ml-act's `incr`): each site is fitted with every earlier map active. null
    # (reference): earlier maps clamped to their source support for linear_act (ml-act's linear_ot
    # config: quantiles_src q_0_100), unclamped for gaussian_act/mean_act (q_all). true/false force it;
    # false is actmerge's former behaviour (the bakeable, unclamped maps act while fitting).
    incremental_clamp: bool | None = Field(
        None, description="incremental: clamp earlier maps to their source support (null: as the reference)"
    )
    # Incremental order. "modules" (reference): model.named_modules() order, which inside a layer is
    # attention, MLP, then the norms (o_proj before input_layernorm). "forward": the order the forward
    # pass reaches the sites (actmerge's former behaviour).
    incremental_order: Literal["modules", "forward"] = Field(
        "modules", description="incremental: named_modules() order (reference) or forward order"
    )
    fit_shift: bool = Field(True, description="false: fit scale-only maps (β = 0), which fold with no biases")
    strength: float = 1.0
    seed: int = 0
    # set by load_recipe(): the directory that relative paths are resolved against
    _base_dir: Path = PrivateAttr(default=Path("."))

    @field_validator("sites")
    @classmethod
    def _sites(cls, v):
        return [SiteSpec(site=s) if isinstance(s, str) else s for s in v]

    @model_validator(mode="before")
    @classmethod
    def _skip_special_alias(cls, data):
        if isinstance(data, dict) and "skip_special_tokens" in data:
            data = dict(data)
            old = data.pop("skip_special_tokens")
            warnings.warn(
                "skip_special_tokens is deprecated: write pooling_special_tokens: "
                f"{'exclude' if old else 'include'} (the default, include, is the reference's).",
                FutureWarning,
                stacklevel=2,
            )
            data.setdefault("pooling_special_tokens", "exclude" if old else "include")
        return data

    @property
    def skip_special_tokens(self) -> bool:
        """True when the mean pooling leaves special tokens out (``pooling_special_tokens: exclude``)."""
        return self.pooling_special_tokens == "exclude"

    def path(self, p: Path) -> Path:
        return p if p.is_absolute() else (self._base_dir / p)

    def read_source(self) -> list[str]:
        return read_sentences(self.path(self.source), self.text_field)

    def read_target(self) -> list[str]:
        return read_sentences(self.path(self.target), self.text_field)

    def content_hash(self) -> str:
        """sha256 over the recipe and the sentence files it fits on (first 16 hex digits)."""
        h = hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode())
        for p in (self.source, self.target):
            h.update(self.path(p).read_bytes())
        return h.hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_recipe(path: str | Path, cls: type[Recipe] = Recipe, what: str = "recipe") -> Recipe:
    """Read and validate a recipe YAML (``cls``: the Recipe subclass, e.g. for diffusion)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{what} {path} does not exist; see recipes/ for examples.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping (name:, method:, sites:, source:, target: …).")
    try:
        recipe = cls(**data)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise RecipeError(f"{path} is not a valid {what}:\n" + "\n".join(lines)) from None
    recipe._base_dir = path.resolve().parent
    if not recipe.sites and not recipe.modules:
        raise RecipeError(f"{path}: give at least one site under `sites:` (or raw `modules:`).")
    for p in (recipe.source, recipe.target):
        read_sentences(recipe.path(p), recipe.text_field)  # fail early on missing/empty files
    return recipe


def read_sentences(path: Path, text_field: str = "text") -> list[str]:
    """Sentences from a txt file (one per line; blank lines and '#' comments skipped) or jsonl."""
    if not path.is_file():
        raise RecipeError(
            f"sentence file {path} does not exist (paths in a recipe are relative to the recipe)."
        )
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecipeError(f"{path}:{i}: not valid JSON ({exc}).") from exc
            text = row.get(text_field) if isinstance(row, dict) else row
            if not isinstance(text, str):
                raise RecipeError(
                    f"{path}:{i}: no string field {text_field!r} (set `text_field:` in the recipe)."
                )
            out.append(text.strip())
    else:
        out = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not out:
        raise RecipeError(f"sentence file {path} is empty.")
    return out
