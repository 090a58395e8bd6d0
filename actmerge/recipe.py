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
from .recipe_files import (  # noqa: F401  (read_sentences, check_sentence_counts: imported from here)
    check_data_paths,
    check_sentence_counts,
    load_mapping,
    read_sentences,
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiteSpec(Strict):
    """Abstract site names (docs/design.md §3) with a layer selection: 'all', '2-5', '0,3,7', '-4:', or
    relative to depth, '50%-100%' (the second half of the stack of any model)."""

    site: str | list[str]
    layers: str | list[int] = "all"

    @property
    def names(self) -> list[str]:
        return [self.site] if isinstance(self.site, str) else list(self.site)


class LineasOptions(Strict):
    """LinEAS optimisation settings (docs/design.md §2); defaults are the paper's."""

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
    early_stop: int = Field(
        0,
        ge=0,
        description="stop once the mean loss of the last N steps is less than early_stop_tol (relative) "
        "below that of the N steps before (0: off; the maps then differ from a full fit's)",
    )
    early_stop_tol: float = Field(1e-3, ge=0)

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


class Recipe(Strict):
    name: str = Field(description="short name, used in output names and model-card tags")
    description: str = ""
    method: Literal["linear_act", "mean_act", "gaussian_act", "lineas"] = "linear_act"
    lineas: LineasOptions | dict[str, LineasOptions] = Field(
        default_factory=LineasOptions,
        description="settings for method: lineas; or per family: {<row name or model_type>: {...}, default: {...}}",
    )
    fold_aware: bool = Field(True, description="lineas: freeze the shifts that the fold plan cannot bake")
    allow_config_change: bool = Field(
        True, description="fold-aware: may shifts use config flags (attention_bias)?"
    )
    targets: list[Literal["transformers", "vllm", "llama.cpp", "gguf"]] = Field(
        default_factory=list, description="fold-aware: runtimes the bake must load in"
    )
    sites: list[SiteSpec | str] | dict[str, list[SiteSpec | str]] = Field(
        default_factory=list,
        description="abstract sites (+layers); or per family: {<row name or model_type>: [...], default: [...]}",
    )
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
    # actmerge's sparsification of the Linear-AcT family (the papers move every neuron; LinEAS has its
    # own, learned sparsity: lineas.l1): after fitting, each site keeps the fraction of its neurons
    # whose map moves most (|log ω| + |β|/rms) and leaves the rest untouched. Measured on detox
    # (recipes/detox-act.yaml): the top quarter keeps the tuning-split reduction at a lower perplexity.
    top_neurons: float | dict[str, float] = Field(
        1.0, description="fraction of each site's neurons moved (the largest moves), 1 = all; or per family"
    )
    strength: float | dict[str, float] = Field(
        1.0, description="λ; or per family: {<row name or model_type>: λ, default: λ}"
    )
    chat: bool = Field(
        False,
        description="chat models: evaluate replies to prompts sent as user turns of the model's chat "
        "template, and fit on sentences placed in the template (chat_fit); models without a template "
        "(base models) use raw text",
    )
    chat_fit: Literal["assistant", "raw", "instruction"] = Field(
        "assistant",
        description="with chat: fitting sentences as assistant replies, or raw text, or (instruction) "
        "the difference the `instruction` makes: every source and target sentence as the reply to a "
        "request of `chat_requests`, sent plain (source) and with the instruction appended (target)",
    )
    instruction: str | None = Field(
        None, description="chat_fit: instruction — what the maps should do, as a user would ask for it"
    )
    chat_requests: Path | None = Field(
        None, description="chat_fit: instruction — user requests the sentences are replies to (fit only)"
    )
    seed: int = 0
    min_sentences: int = Field(16, ge=2, description="refuse a fit with fewer sentences on either side")
    # set by load_recipe(): the directory that relative paths are resolved against, and the file
    _base_dir: Path = PrivateAttr(default=Path("."))
    _file: Path | None = PrivateAttr(default=None)

    @property
    def source_file(self) -> Path | None:
        """The YAML this recipe was read from (None when built in code)."""
        return self._file

    @field_validator("sites")
    @classmethod
    def _sites(cls, v):
        def specs(items):
            return [SiteSpec(site=s) if isinstance(s, str) else s for s in items]

        if isinstance(v, dict):
            _check_families(v)
            return {k: specs(items) for k, items in v.items()}
        return specs(v)

    @field_validator("lineas", mode="before")
    @classmethod
    def _lineas_per_family(cls, v):
        # one block of options, or one per family: the keys say which (a family key is never an option)
        if isinstance(v, dict) and set(v) & (_family_names() | {"default"}):
            _check_families(v)  # a mix of options and family keys is refused here, naming the options
        elif isinstance(v, dict):
            nested = sorted(
                k for k, x in v.items() if isinstance(x, dict) and k not in LineasOptions.model_fields
            )
            if nested:  # meant as a family's block, under a name the site table does not have
                _check_families(dict.fromkeys(nested))
            try:
                return LineasOptions.model_validate(v)
            except ValidationError as e:  # say it once, not once per member of the union
                why = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
                raise ValueError(why) from None
        return v

    @field_validator("strength", "top_neurons")
    @classmethod
    def _per_family(cls, v):
        if isinstance(v, dict):
            _check_families(v)
        return v

    def with_lineas(self, **changes) -> Recipe:
        """A copy with ``changes`` applied to every family's LinEAS options (bench variants, tests)."""
        update = lambda o: o.model_copy(update=changes)  # noqa: E731
        lineas = (
            {k: update(o) for k, o in self.lineas.items()}
            if isinstance(self.lineas, dict)
            else update(self.lineas)
        )
        return self.model_copy(update={"lineas": lineas})  # keeps _base_dir and _file

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

    @field_validator("top_neurons")
    @classmethod
    def _top_neurons_range(cls, v):
        for f in v.values() if isinstance(v, dict) else [v]:
            if not 0.0 < f <= 1.0:
                raise ValueError(f"top_neurons must be a fraction in (0, 1], got {f}")
        return v

    @model_validator(mode="after")
    def _instruction_fit(self):
        if self.chat_fit == "instruction" and not (self.instruction and self.chat_requests):
            raise ValueError(
                "chat_fit: instruction needs `instruction:` (e.g. 'Relate your answer to football.') "
                "and `chat_requests:` (a file of user requests to pair the sentences with)."
            )
        if self.chat_fit != "instruction" and (self.instruction or self.chat_requests):
            raise ValueError("`instruction:` and `chat_requests:` are read only with chat_fit: instruction.")
        return self

    @model_validator(mode="after")
    def _top_neurons_method(self):
        fractions = self.top_neurons.values() if isinstance(self.top_neurons, dict) else [self.top_neurons]
        if self.method == "lineas" and min(fractions) < 1.0:
            raise ValueError(
                "top_neurons is for linear_act / mean_act / gaussian_act; LinEAS learns its own "
                "sparsity: set lineas.l1 (and lineas.group) instead."
            )
        return self

    def path(self, p: Path) -> Path:
        return p if p.is_absolute() else (self._base_dir / p)

    def based_at(self, base_dir: Path) -> Recipe:
        """A copy whose relative paths resolve against ``base_dir`` (for a recipe built in code)."""
        copy = self.model_copy()
        copy._base_dir = Path(base_dir)
        return copy

    def data_paths(self) -> dict[str, Path]:
        """Every path field that is set (field → the path as written), used by this run or not."""
        return {f: v for f in type(self).model_fields if isinstance(v := getattr(self, f), Path)}

    def used_paths(self, *, evaluated: bool = False, tuned: bool = False) -> dict[str, Path]:
        """The path fields a bake reads (field → the path as written): the fit's sentence files
        always; with ``evaluated`` (bake --eval) the eval prompts, the neutral text and, for the
        concept metric, the keywords; with ``tuned`` (--strength auto) the tuning split and, for the
        concept metric, the keywords. Only these are shipped inside a checkpoint."""
        fields = ["source", "target", "chat_requests"]
        if evaluated:
            fields += ["eval_prompts", "eval_prompts_hard", "neutral_text"]
        if tuned:
            fields += ["tune_prompts", "tune_neutral"]
        if (evaluated or tuned) and "concept" in self.metrics:
            fields.append("keywords")
        paths = self.data_paths()
        return {f: paths[f] for f in fields if f in paths}

    def read_source(self) -> list[str]:
        return read_sentences(self.path(self.source), self.text_field)

    def read_target(self) -> list[str]:
        return read_sentences(self.path(self.target), self.text_field)

    def content_hash(self) -> str:
        """sha256 over the recipe and the sentence files it fits on (first 16 hex digits)."""
        fields = self.model_dump(mode="json")
        if fields.get("top_neurons") == 1.0:  # added later: recipes without it keep their hash
            del fields["top_neurons"]
        for key in ("instruction", "chat_requests"):  # the same, for chat_fit: instruction
            if fields.get(key) is None:
                del fields[key]
        h = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
        for p in (self.source, self.target, self.chat_requests):
            if p is not None:
                h.update(self.path(p).read_bytes())
        return h.hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _family_names() -> set[str]:
    from .sites import ARCHITECTURES

    return {a.name for a in ARCHITECTURES} | {t for a in ARCHITECTURES for t in a.model_types}


def _check_families(v: dict) -> None:
    unknown = sorted(set(v) - _family_names() - {"default"})
    if unknown:
        raise ValueError(
            f"unknown architecture key(s) {unknown}: use a row name of the site table "
            f"({', '.join(sorted(_family_names()))}) or 'default'"
        )


def for_family(value, arch, what: str):
    """A per-family field's value for an architecture row: the value itself when it is not a mapping,
    else the row's entry (its name, a model_type), else ``default``."""
    if not isinstance(value, dict):
        return value
    for key in (arch.name, *arch.model_types, "default"):
        if key in value:
            return value[key]
    raise RecipeError(
        f"the recipe's `{what}:` has no entry for {arch.name} (keys: {', '.join(value)}): "
        f"add `{arch.name}:` or `default:` under `{what}:`."
    )


def load_recipe(path: str | Path, cls: type[Recipe] = Recipe, what: str = "recipe", *, log=None) -> Recipe:
    """Read and validate a recipe YAML (``cls``: the Recipe subclass, e.g. for diffusion).

    ``path``: a file, or the name of a built-in recipe (``detox``, ``detox.yaml``): a file at that
    path wins (``recipes_catalog.find_recipe``); ``log`` says when a built-in was taken."""
    from .recipes_catalog import BUILTIN_DIR, find_recipe

    path = find_recipe(path, log=log)
    data = load_mapping(path, what)
    try:
        recipe = cls(**data)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise RecipeError(f"{path} is not a valid {what}:\n" + "\n".join(lines)) from None
    except RecursionError:
        raise RecipeError(f"{path} is nested too deeply to be a {what}: write a flat mapping.") from None
    recipe._base_dir = path.resolve().parent
    recipe._file = path.resolve()
    if not recipe.sites and not recipe.modules:
        raise RecipeError(f"{path}: give at least one site under `sites:` (or raw `modules:`).")
    # every path field, used or not: beside the recipe (or in the built-in recipes' data)
    check_data_paths(path, recipe._base_dir, recipe.data_paths(), also=(BUILTIN_DIR,))
    for p in (recipe.source, recipe.target):
        read_sentences(recipe.path(p), recipe.text_field)  # fail early on missing/empty files
    return recipe
