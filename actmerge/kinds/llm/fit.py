"""Fitting a language model: the recipe's sites, the sentences (in the chat template where the recipe
asks), the estimator or LinEAS end to end, and the checks a maps file or checkpoint passes first."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ... import chat, distributed
from ...errors import NotFoldableError, PlacementError
from ...fold import FoldOptions
from ...io.st_format import tensor_index
from ...maps import MapSet
from ...memory import MemoryEstimate, lineas_memory, site_dim
from ...models import load_tokenizer
from ...placement import offloaded
from ...recipe import Recipe
from ...recipe_sections import sections_of as sections
from ...shifts import scale_home, shift_home
from ...sites import Site, architecture_for, resolve_sites, site_for_key
from ..base import FitRequest, FitResult
from .collect import CollectOptions, FitOptions, batches
from .collect import fit as fit_maps
from .plan import check_maps
from .source import load


def preflight_checkpoint(source) -> None:
    """Before any model load: every safetensors header of the checkpoint is readable and complete
    (a truncated or garbage file is a clear error here, not a traceback from deep inside a loader)."""
    if hasattr(source, "safetensors_files"):
        tensor_index(source.safetensors_files())


def preflight_maps(maps: MapSet, source, log=print) -> None:
    """Before any model load: the maps fit this model (every module a site of it, every width its
    width; an error naming the model they were fitted on), and a warning where they fit but their
    ``base_model`` names another model."""

    config = source.config
    tensors, _ = tensor_index(source.safetensors_files())
    check_maps(architecture_for(config), config, maps, tensors, source.name)
    if maps.base_model and not same_model(maps.base_model, source):
        log(
            f"warning: these maps were fitted on {maps.base_model}, not {source.name}; their modules and "
            "widths match this model, so they are used as they are."
        )


def same_model(name: str, source) -> bool:
    """Whether a recorded model name (a maps file's ``base_model``) names ``source``: the same name,
    or a local directory that is the same one."""
    if name == source.name:
        return True
    try:
        return Path(name).is_dir() and Path(name).resolve() == Path(source.path).resolve()
    except OSError:
        return False


def recipe_sites(recipe: Recipe, config: dict) -> list[Site]:
    arch = architecture_for(config)
    sec = sections(recipe, arch)
    sites: list[Site] = []
    for spec in sec.need("sites"):
        sites += resolve_sites(arch, config, spec.names, spec.layers)
    sites += [site_for_key(arch, config, key) for key in sec.fit.modules]
    uniq = {s.key: s for s in sites}
    return sorted(uniq.values(), key=lambda s: s.order)


def gguf_sites(sites: list[Site], config: dict, options: FoldOptions, log=print) -> list[Site]:
    """``--target gguf``: the recipe's sites whose scale folds exactly into a quantised GGUF (norm
    gains); the others are left out of the fit with a note, and none left is an error."""
    arch = architecture_for(config)
    keep = [s for s in sites if scale_home(arch, s.name, options.targets)[0]]
    dropped = sorted({s.name for s in sites} - {s.name for s in keep})
    if dropped:
        why = scale_home(arch, dropped[0], options.targets)[1]
        log(f"--target gguf: left out sites {', '.join(dropped)} ({dropped[0]}: {why})")
    if sites and not keep:
        raise NotFoldableError(
            f"--target gguf: none of the recipe's sites ({', '.join(sorted({s.name for s in sites}))}) folds "
            "exactly into a quantised GGUF. Choose norm sites (see `actmerge sites MODEL --target gguf`), or "
            "drop --target gguf."
        )
    return keep


def fit(model, recipe: Recipe, request: FitRequest) -> FitResult:
    """Collect activations on the recipe's sentences at its sites and fit one map per site (LinEAS: end
    to end, freezing the shifts the fold plan cannot bake under ``request.options``)."""
    revision, placement, options = request.revision, request.placement, request.options
    progress, log = request.progress, request.log
    loaded = load(model, revision=revision, placement=placement, log=log)
    config = loaded.source.config
    sites = gguf_sites(recipe_sites(recipe, config), config, options, log)
    source, target = recipe.read_source(), recipe.read_target()
    source, target = source[: recipe.max_sentences], target[: recipe.max_sentences]
    preflight_checkpoint(loaded.source)
    tok = load_tokenizer(loaded.source)
    source, target = chat.fit_texts(tok, source, target, sections(recipe).chat)  # the chat fit mode
    if recipe.method == "lineas":
        batch = min(sections(recipe, architecture_for(config)).need("lineas").batch, len(source))
        tokens = longest(tok, source + target, recipe.max_tokens)
        estimate = lineas_estimate(recipe, config, sites, batch, len(target), loaded.source.path, tokens)
        log(estimate.describe(batch, tokens, ranks()))
    m, tok = loaded.get()
    lineas = recipe.method == "lineas"
    if lineas and "disk" in offloaded(m):
        raise PlacementError(
            "LinEAS back-propagates through every layer, so disk-offloaded weights would all be held "
            "for the backward pass: raise --max-memory until nothing goes to disk, or fit with "
            "linear_act / mean_act (forward passes only), which work with disk offload."
        )
    frozen = frozen_shifts(recipe, config, sites, options) if lineas else None
    t0 = time.perf_counter()
    maps, report = fit_sites(m, tok, recipe, sites, source, target, frozen=frozen, progress=progress, log=log)
    if lineas:
        detail = "LinEAS (end to end)"
    else:
        how = "shift-only" if recipe.degenerate_neurons == "shift" else "left untouched"
        detail = f"degenerate neurons ({how}): {report.degenerate}"
    seconds = time.perf_counter() - t0
    mapset = MapSet(
        maps,
        base_model=loaded.source.name,
        method=recipe.method,
        recipe_hash=recipe.content_hash(),
        extra={
            "recipe": recipe.name,
            "n_source": str(len(source)),
            "n_target": str(len(target)),
            "degenerate_neurons": str(getattr(report, "degenerate", 0)),
        },
    )
    log(
        f"fitted {len(maps)} maps ({sum(a.dim for a in maps.values())} neurons) on {len(source)} source / "
        f"{len(target)} target sentences in {seconds:.1f}s; {detail}"
    )
    return FitResult(mapset, report, recipe, seconds)


def ranks() -> int:
    """Processes the launcher started (1 without one); known before the process group opens."""
    return int(os.environ.get("WORLD_SIZE", "1") or "1") if distributed.launched() else 1


def longest(tok, sentences: list, max_tokens: int) -> int:
    """Tokens of the longest sentence as the fit's batches hold it (``collect.batches``: truncated at
    ``max_tokens``, a chat template's own tokens included): a batch is padded to its own longest
    sentence, so no step holds more."""
    held = batches(tok, sentences, batch_size=64, max_tokens=max_tokens)
    return max((b.inputs["input_ids"].shape[1] for b in held), default=1)


def lineas_estimate(
    recipe: Recipe, config: dict, sites: list[Site], batch: int, n_target: int, path=None, tokens=None
) -> MemoryEstimate:
    """The memory one process of a LinEAS fit of ``recipe`` at ``sites`` needs (``memory``), before
    loading: ``batch`` sentences a step of ``tokens`` tokens (default the recipe's ``max_tokens``),
    the forward up to the last site's layer."""
    return lineas_memory(
        config,
        site_dims=[site_dim(s.name, config) for s in sites],
        batch=batch,
        tokens=recipe.max_tokens if tokens is None else tokens,
        n_target=n_target,
        layers=max((s.layer for s in sites), default=0) + 1,
        ranks=ranks(),
        path=path,
    )


def frozen_shifts(recipe: Recipe, config: dict, sites: list[Site], options: FoldOptions) -> dict[str, str]:
    """Fold-aware fitting: site key → why its shift must stay 0 for this architecture/runtime set."""
    arch = architecture_for(config)
    if not recipe.fit_shift:
        return {s.key: "the recipe fits scale-only maps (fit_shift: false)" for s in sites}
    if not recipe.fold_aware:
        return {}
    out = {}
    for s in sites:
        ok, why, _, _ = shift_home(
            arch, config, s.name, targets=options.targets, allow_flags=options.allow_config_change
        )
        if not ok:
            out[s.key] = why
    return out


def fit_sites(
    model, tok, recipe: Recipe, sites: list[Site], source, target, *, frozen=None, progress=True, log=print
):
    """Fit the recipe's method at ``sites`` on sentences already read (and placed in the chat template
    where the recipe asks): LinEAS end to end (``frozen``: site key → why its shift stays 0), or the
    recipe's estimator site by site. Returns (maps by site key, the method's report)."""
    sec = sections(recipe, architecture_for(model.config))
    fs = sec.fit
    if fs.method == "lineas":
        from ...lineas import LineasConfig, fit_lineas

        return fit_lineas(
            model, tok, sites, source, target,
            frozen_shift=frozen or {},
            cfg=LineasConfig.from_options(sec.need("lineas"), seed=fs.seed),
            collection=CollectOptions(  # the target rows in collect's default batches
                max_tokens=fs.max_tokens, pooling=fs.pooling, skip_special=fs.skip_special
            ),
            progress=progress, log=log,
        )  # fmt: skip
    options = FitOptions(
        method=fs.method, incremental=fs.incremental, fit_shift=fs.fit_shift,
        degenerate=fs.degenerate, sample=fs.sample, seed=fs.seed,
        incremental_clamp=fs.incremental_clamp, incremental_order=fs.incremental_order,
        top_neurons=sec.need("top_neurons"),
    )  # fmt: skip
    collection = CollectOptions(
        batch_size=fs.batch_size, max_tokens=fs.max_tokens, pooling=fs.pooling,
        skip_special=fs.skip_special,
    )  # fmt: skip
    return fit_maps(
        model, tok, sites, source, target, options=options, collection=collection, progress=progress
    )  # fmt: skip
