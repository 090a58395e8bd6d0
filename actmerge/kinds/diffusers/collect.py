"""Collection and fitting for pipelines, per the ml-act protocol (docs/design.md §8).

Each batch of prompts runs through the pipeline itself (its own prompt encoding, scheduler,
latents from a seeded generator) and stops right after the FIRST denoiser call: statistics are
those of the first denoising step. Samples per site:
  * text-encoder sites: one vector per prompt, the mean over its real tokens (up to and including
    the first end-of-text token, or the attention mask the pipeline passes); only the encoder's
    first call per batch is kept (diffusers encodes the prompts before the negative prompts).
  * denoiser sites: when classifier-free guidance doubles the batch ([uncond; cond]) only the
    conditional half is kept; every image position (pixel of a ``[B, C, H, W]`` feature map, token
    of a ``[B, T, D]`` sequence) is a sample of its channel's distribution, ``pixel_samples`` of
    them drawn per prompt. The maps are per channel: the form that folds into a GroupNorm.
The fitted maps are applied at every denoising step, by hooks or once baked.
"""

from __future__ import annotations

import inspect
import time
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from ... import __version__
from ...errors import ActivationError, NotFoldableError
from ...estimators import ESTIMATORS, keep_top
from ...maps import AffineMap, MapSet
from ...placement import pick_device
from ...recipe_sections import sections_of as sections
from .hooks import attach
from .plan import shift_home
from .recipe import DiffusionRecipe
from .sites import DSite, resolve, site_for_key
from .source import PipelineSource
from .table import FEATURE_MAPS, component_for

# pipeline arguments that make a run deterministic and offline, passed where the pipeline takes them
CALL_DEFAULTS = {"clean_caption": False, "use_resolution_binning": False}


class _FirstStepDone(Exception):
    """Raised by the denoiser hook after its first call: nothing else of the pipeline needs to run."""


def load_pipeline(source: PipelineSource, device: str | None = None, dtype=torch.float32):
    """The pipeline in float32 on ``device`` (default: cuda when present, else cpu)."""
    from diffusers import DiffusionPipeline

    with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; older lack dtype
        warnings.simplefilter("ignore", FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(str(source.path), torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(pick_device(device))


def denoiser_name(source: PipelineSource) -> str:
    for name, cls in source.components.items():
        row = component_for(cls)
        if row is not None and row.role == "denoiser":
            return name
    raise NotFoldableError(
        f"no component of {source.pipeline_class or source.path} is a denoiser actmerge knows "
        "(UNet2DConditionModel, PixArt/SD3/FLUX transformers)."
    )


def call_kwargs(pipe, **kwargs) -> dict:
    """``kwargs`` plus CALL_DEFAULTS, keeping only what this pipeline's __call__ accepts."""
    params = inspect.signature(pipe.__call__).parameters
    merged = {**CALL_DEFAULTS, **{k: v for k, v in kwargs.items() if v is not None}}
    return {k: v for k, v in merged.items() if k in params}


def recipe_sites(source: PipelineSource, recipe: DiffusionRecipe) -> list[DSite]:
    sites: list[DSite] = []
    for spec in recipe.sites:
        for name in spec.names:
            sites += resolve(source, name, spec.layers)
    sites += [site_for_key(source, key) for key in recipe.modules]
    return list({s.key: s for s in sites}.values())


def _tokenizer_for(pipe, component: str):
    return getattr(pipe, component.replace("text_encoder", "tokenizer"), None)


@dataclass
class _Batch:
    size: int
    seed: int
    calls: dict[str, int]
    masks: dict[str, torch.Tensor]


@contextmanager
def _recording(pipe, source: PipelineSource, sites: list[DSite], pixel_samples: int, state: dict):
    """Hooks that append samples to ``state['store'][key]`` for the batch in ``state['batch']``."""
    components = pipe.components
    denoiser = denoiser_name(source)
    texts = {s.component for s in sites if s.arch.role == "text_encoder"}
    store: dict[str, list[torch.Tensor]] = state["store"]

    def text_pre(component):
        eos = getattr(_tokenizer_for(pipe, component), "eos_token_id", None)

        def pre(_mod, args, kwargs):
            b: _Batch = state["batch"]
            b.calls[component] = b.calls.get(component, 0) + 1
            ids = args[0] if args else kwargs.get("input_ids")
            mask = kwargs.get("attention_mask")
            b.masks[component] = mask if mask is not None else _through_first(ids, eos)

        return pre

    def text_fn(site: DSite):
        def fn(a: torch.Tensor) -> None:
            b: _Batch = state["batch"]
            if b.calls.get(site.component) != 1:
                return  # the negative prompts (classifier-free guidance)
            m = b.masks[site.component].to(a.device, torch.float32).unsqueeze(-1)
            store[site.key].append(((a.float() * m).sum(1) / m.sum(1).clamp_min(1.0)).cpu())

        return fn

    def denoiser_fn(site: DSite, index: int):
        def fn(a: torch.Tensor) -> None:
            b: _Batch = state["batch"]
            if a.shape[0] == 2 * b.size:
                a = a[b.size :]  # [uncond; cond]: the conditional half
            elif a.shape[0] != b.size:
                raise ActivationError(
                    f"{site.key}: batch of {a.shape[0]} for {b.size} prompts (num_images_per_prompt must be 1)."
                )
            tokens = a.flatten(2).transpose(1, 2) if a.dim() == 4 else a  # [B, positions, channels]
            n = tokens.shape[1]
            if pixel_samples and n > pixel_samples:
                g = torch.Generator().manual_seed(b.seed * 7919 + index)
                tokens = tokens[:, torch.randperm(n, generator=g)[:pixel_samples].to(a.device)]
            store[site.key].append(tokens.reshape(-1, tokens.shape[-1]).float().cpu())

        return fn

    def stop(_mod, _args, _out):
        raise _FirstStepDone

    with ExitStack() as stack:
        for comp in texts:
            h = components[comp].register_forward_pre_hook(text_pre(comp), with_kwargs=True)
            stack.callback(h.remove)
        for i, site in enumerate(sites):
            fn = text_fn(site) if site.arch.role == "text_encoder" else denoiser_fn(site, i)
            stack.enter_context(attach(components, site.key, fn))
        h = components[denoiser].register_forward_hook(stop)
        stack.callback(h.remove)
        yield


def _through_first(ids: torch.Tensor, eos: int | None) -> torch.Tensor:
    """1 for every token up to and including the first end-of-text token (all, if none)."""
    if eos is None:
        return torch.ones_like(ids, dtype=torch.float32)
    hit = (ids == eos).int()
    before = (hit.cumsum(1) - hit) == 0  # no eos strictly before this position
    return before.float()


def collect(
    pipe, source: PipelineSource, sites: list[DSite], prompts: list[str], recipe: DiffusionRecipe
) -> dict[str, torch.Tensor]:
    """``{site key: [N, D]}`` float32 samples at the first denoising step."""
    opts = recipe.diffusion
    state: dict = {"store": {s.key: [] for s in sites}}
    with _recording(pipe, source, sites, opts.pixel_samples, state), torch.no_grad():
        for i in range(0, len(prompts), recipe.batch_size):
            batch = prompts[i : i + recipe.batch_size]
            seed = recipe.seed + i
            state["batch"] = _Batch(len(batch), seed, {}, {})
            kwargs = call_kwargs(
                pipe,
                prompt=batch,
                num_inference_steps=opts.steps,
                guidance_scale=opts.guidance_scale,
                height=opts.height,
                width=opts.width,
                generator=torch.Generator().manual_seed(seed),
                output_type="latent",
            )
            try:
                pipe(**kwargs)
            except _FirstStepDone:
                pass
            else:
                raise ActivationError("the pipeline finished without calling its denoiser.")
    out = {}
    for key, parts in state["store"].items():
        if not parts:
            raise ActivationError(f"{key} saw no activations: the pipeline never ran that module.")
        x = torch.cat(parts)
        if not torch.isfinite(x).all():
            raise ActivationError(f"non-finite activations at {key}: try float32 or check the checkpoint.")
        out[key] = x
    return out


@dataclass
class DiffusionFit:
    maps: MapSet
    sites: list[DSite]
    seconds: float
    scale_only: dict[str, str]  # key → why its shift was not fitted


def fit_pipeline(
    source: PipelineSource, recipe: DiffusionRecipe, *, pipe=None, device: str | None = None, log=print
) -> DiffusionFit:
    """Collect first-step statistics on the recipe's prompt sets and fit one map per site."""
    why = FEATURE_MAPS[recipe.diffusion.feature_maps]
    if why:
        raise NotFoldableError(f"feature_maps: {recipe.diffusion.feature_maps} cannot be baked: {why}")
    estimator = ESTIMATORS[recipe.method]
    sites = recipe_sites(source, recipe)
    scale_only = _scale_only(source, recipe, sites)
    if recipe.method == "mean_act" and scale_only:
        raise NotFoldableError(
            "mean_act fits shifts only, and these sites have no bias to take one: "
            + "; ".join(f"{k}: {w}" for k, w in scale_only.items())
            + ". Choose biased sites or use linear_act / gaussian_act with fit_shift: false."
        )
    source_prompts = recipe.read_source()[: recipe.max_sentences]
    target_prompts = recipe.read_target()[: recipe.max_sentences]
    pipe = pipe if pipe is not None else load_pipeline(source, device)
    top = sections(recipe).need("top_neurons")
    t0 = time.perf_counter()
    src = collect(pipe, source, sites, source_prompts, recipe)
    tgt = collect(pipe, source, sites, target_prompts, recipe)
    maps: dict[str, AffineMap] = {}
    degenerate = 0
    for site in sites:
        amap, info = estimator(
            src[site.key],
            tgt[site.key],
            seed=recipe.seed,
            fit_shift=site.key not in scale_only,
            degenerate=recipe.degenerate_neurons,
            sample=recipe.sample,
        )
        maps[site.key] = keep_top(amap, src[site.key], top)
        degenerate += info.degenerate
    seconds = time.perf_counter() - t0
    log(
        f"fitted {len(maps)} maps ({sum(m.dim for m in maps.values())} channels) on {len(source_prompts)} / "
        f"{len(target_prompts)} prompts at the first of {recipe.diffusion.steps} steps in {seconds:.1f}s; "
        f"scale-only (no bias for a shift): {len(scale_only)}; degenerate channels: {degenerate}"
    )
    mapset = MapSet(
        maps,
        base_model=source.name,
        method=recipe.method,
        recipe_hash=recipe.content_hash(),
        extra={
            "recipe": recipe.name,
            "kind": "diffusion",
            "n_source": str(len(source_prompts)),
            "n_target": str(len(target_prompts)),
            "degenerate_channels": str(degenerate),
            "actmerge_version": __version__,
        },
    )
    return DiffusionFit(mapset, sites, seconds, scale_only)


def _scale_only(source: PipelineSource, recipe: DiffusionRecipe, sites: list[DSite]) -> dict[str, str]:
    """Fold-aware fitting: sites whose shift has no bias to go into are fitted scale-only."""
    if not recipe.fit_shift:
        return {s.key: "fit_shift: false" for s in sites}
    if not recipe.fold_aware:
        return {}
    out = {}
    for s in sites:
        homes, why = shift_home(source, s)
        if not homes:
            out[s.key] = why
    return out
