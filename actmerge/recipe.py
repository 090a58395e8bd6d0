"""Recipes: a validated, frozen description of what to steer and how (YAML, unknown keys rejected)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

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
    loss_norm: Literal["none", "target_std"] = "none"
    param: Literal["linear", "log"] = Field(
        "linear", description="learn ω directly (linear) or as exp(θ) (log: ω stays positive)"
    )


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
    eval_prompts_hard: Path | None = Field(
        None,
        description="a harder held-out prompt set, reported beside eval_prompts (never fitted or tuned on)",
    )
    neutral_text: Path | None = Field(None, description="neutral text for perplexity")
    tune_prompts: Path | None = Field(
        None, description="prompts `actmerge tune` measures the behaviour on (never the eval prompts)"
    )
    tune_neutral: Path | None = Field(
        None, description="neutral text `actmerge tune` measures the cost on (perplexity, KL)"
    )
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
    skip_special_tokens: bool = True
    incremental: bool = False
    fit_shift: bool = Field(True, description="false: fit scale-only maps (β = 0), which fold with no biases")
    strength: float = 1.0
    seed: int = 0
    # set by load_recipe(): the directory that relative paths are resolved against
    _base_dir: Path = PrivateAttr(default=Path("."))

    @field_validator("sites")
    @classmethod
    def _sites(cls, v):
        return [SiteSpec(site=s) if isinstance(s, str) else s for s in v]

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
