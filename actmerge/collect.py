"""Activation collection and map fitting over prompt sets.

Memory grows with sentences × dims (one pooled vector per sentence per site), never with tokens.
Forward passes run through ``model.base_model`` so the (large) LM head is never computed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from rich.progress import track

from .errors import ActivationError
from .estimators import ESTIMATORS, FitInfo
from .hooks import Pooler, affine_fn, attach, record
from .maps import AffineMap
from .placement import input_device
from .sites import Site


@dataclass(frozen=True)
class Batch:
    inputs: dict[str, torch.Tensor]
    token_mask: torch.Tensor  # [B, T]: 1 where a token is pooled


def batches(
    tok,
    sentences: list[str],
    *,
    batch_size: int,
    max_tokens: int,
    skip_special: bool = True,
    device: str | torch.device = "cpu",
) -> Iterator[Batch]:
    """Left-padded, truncated batches with the mask of tokens to pool.

    Chat-templated sentences (``chat.Turn``, which carry the character span of their content) pool
    only the tokens inside that span; the template's own tokens are the same for every sentence."""
    tok.padding_side = "left"
    for i in range(0, len(sentences), batch_size):
        chunk = sentences[i : i + batch_size]
        spans = [getattr(s, "span", None) for s in chunk]
        templated = any(sp is not None for sp in spans)
        enc = tok(
            [str(s) for s in chunk],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_tokens,
            return_special_tokens_mask=True,
            return_offsets_mapping=templated,
            add_special_tokens=not templated,  # a template writes its own BOS
        )
        special = enc.pop("special_tokens_mask")
        offsets = enc.pop("offset_mapping", None)
        mask = enc["attention_mask"].clone()
        if skip_special:
            kept = mask * (1 - special)
            mask = torch.where(kept.sum(1, keepdim=True) > 0, kept, mask)  # never pool nothing
        if templated:
            inside = torch.zeros_like(mask)
            for r, sp in enumerate(spans):
                if sp is None:
                    inside[r] = 1
                else:
                    inside[r] = (offsets[r, :, 1] > sp[0]) & (offsets[r, :, 0] < sp[1])
            kept = mask * inside
            mask = torch.where(kept.sum(1, keepdim=True) > 0, kept, mask)
        yield Batch({k: v.to(device) for k, v in enc.items()}, mask)


def _bar(it: Iterable, total: int, desc: str, show: bool) -> Iterable:
    return track(it, total=total, description=desc, transient=True) if show else it


@torch.no_grad()
def collect(
    model,
    tok,
    sentences: list[str],
    keys: list[str],
    *,
    batch_size: int = 16,
    max_tokens: int = 128,
    pooling: str = "mean",
    skip_special: bool = True,
    desc: str = "collecting",
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Pooled activations ``{key: [N, D]}`` (float32, CPU), one row per sentence.

    Works on a model dispatched by accelerate (``device_map``, disk offload): inputs go to the input
    embedding's execution device, each site pools on its own device. The ``[N, D]`` results are
    allocated once and filled batch by batch (no concatenation copy: peak = the statistics)."""
    if not sentences:
        raise ActivationError("no sentences to collect activations on.")
    pooler = Pooler(pooling)
    n_batches = -(-len(sentences) // batch_size)
    out: dict[str, torch.Tensor] = {}
    row = 0
    with record(model, keys, pooler) as store:
        for b in _bar(
            batches(
                tok,
                sentences,
                batch_size=batch_size,
                max_tokens=max_tokens,
                skip_special=skip_special,
                device=input_device(model),
            ),
            n_batches,
            desc,
            progress,
        ):
            pooler.mask = b.token_mask
            model.base_model(**b.inputs)
            row = _drain(store, out, row, len(sentences))
    return out


def _drain(store: dict[str, list[torch.Tensor]], out: dict[str, torch.Tensor], row: int, n: int) -> int:
    """Move one batch's pooled rows ``{key: [[B, D]]}`` into the CPU results at ``row``, checking them
    for NaN/Inf; returns the next row. Rows on an accelerator travel in one copy per device (one sync,
    not one per site)."""
    pooled = {key: _single(key, rows) for key, rows in store.items()}
    by_device: dict[torch.device, list[str]] = {}
    for key, rows in pooled.items():
        by_device.setdefault(rows.device, []).append(key)
    end = row
    for device, keys in by_device.items():
        parts = [pooled[k] for k in keys]
        if device.type != "cpu":
            parts = torch.cat(parts, dim=1).cpu().split([p.shape[1] for p in parts], dim=1)
        for key, part in zip(keys, parts, strict=True):
            if key not in out:
                out[key] = torch.empty(n, part.shape[1], dtype=torch.float32)
            end = row + len(part)
            dest = out[key][row:end]
            dest.copy_(part)
            if not torch.isfinite(dest).all():
                raise ActivationError(
                    f"non-finite activations at {key}: the model produced NaN/Inf on these sentences "
                    "(try float32, shorter max_tokens, or check the checkpoint)."
                )
    return end


def _single(key: str, rows: list[torch.Tensor]) -> torch.Tensor:
    """The one ``[B, D]`` block a site pooled in this forward pass (and empty the list)."""
    if len(rows) != 1:
        raise ActivationError(
            f"site {key} ran {len(rows)} times in one forward pass (expected once): "
            "is the module reused, or missing from the model's forward?"
        )
    return rows.pop()


@dataclass
class FitReport:
    per_site: dict[str, FitInfo]
    # source support per site, (min, max) of the pooled source values: ml-act's clamp (hooks.steer)
    support: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def degenerate(self) -> int:
        return sum(i.degenerate for i in self.per_site.values())


def fit(
    model,
    tok,
    sites: list[Site],
    source: list[str],
    target: list[str],
    *,
    method: str = "linear_act",
    incremental: bool = False,
    batch_size: int = 16,
    max_tokens: int = 128,
    pooling: str = "mean",
    skip_special: bool = True,
    fit_shift: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, AffineMap], FitReport]:
    """Fit one map per site. Incremental mode (the paper's): sites in forward order, each fitted on
    activations computed with every earlier map active at λ = 1, for source and target alike."""
    estimator = ESTIMATORS[method]
    keys = [s.key for s in sites]
    if len(set(keys)) != len(keys):
        raise ActivationError("the same module/side is selected twice; list each site once.")
    opts = dict(
        batch_size=batch_size,
        max_tokens=max_tokens,
        pooling=pooling,
        skip_special=skip_special,
        progress=progress,
    )
    maps: dict[str, AffineMap] = {}
    infos: dict[str, FitInfo] = {}
    if not incremental:
        src = collect(model, tok, source, keys, desc="source sentences", **opts)
        tgt = collect(model, tok, target, keys, desc="target sentences", **opts)
        for key in keys:
            maps[key], infos[key] = estimator(src[key], tgt[key], seed=seed, fit_shift=fit_shift)
        support = {k: (v.min(0).values, v.max(0).values) for k, v in src.items()}
        return maps, FitReport(infos, support)
    return _fit_incremental(
        model, tok, sites, source, target, estimator, seed=seed, fit_shift=fit_shift, **opts
    )


@torch.no_grad()
def _fit_incremental(
    model,
    tok,
    sites,
    source,
    target,
    estimator,
    *,
    seed,
    fit_shift,
    batch_size,
    max_tokens,
    pooling,
    skip_special,
    progress,
):
    """One forward pass over source+target together: at each site (forward order) pool, fit the map
    on this batch's source/target rows, then apply it before the activation flows on."""
    from contextlib import ExitStack

    n_src = len(source)
    device = input_device(model)
    batch = next(
        batches(
            tok,
            source + target,
            batch_size=len(source) + len(target),
            max_tokens=max_tokens,
            skip_special=skip_special,
            device=device,
        )
    )
    pooler = Pooler(pooling)
    pooler.mask = batch.token_mask
    maps: dict[str, AffineMap] = {}
    infos: dict[str, FitInfo] = {}
    support: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    bar = track(range(len(sites)), description="incremental fit", transient=True) if progress else None
    it = iter(bar) if bar is not None else None

    def make(key: str):
        def fn(a: torch.Tensor) -> torch.Tensor:
            pooled = pooler(a)
            if not torch.isfinite(pooled).all():
                raise ActivationError(f"non-finite activations at {key} during incremental fitting.")
            src = pooled[:n_src].cpu()
            maps[key], infos[key] = estimator(src, pooled[n_src:].cpu(), seed=seed, fit_shift=fit_shift)
            support[key] = (src.min(0).values, src.max(0).values)
            if it is not None:
                next(it, None)
            return affine_fn(maps[key].omega, maps[key].beta)(a)

        return fn

    with ExitStack() as stack:
        for s in sites:
            stack.enter_context(attach(model, s.key, make(s.key)))
        model.base_model(**batch.inputs)
    if it is not None:
        for _ in it:
            pass
    ordered = {s.key: maps[s.key] for s in sites if s.key in maps}
    if len(ordered) != len(sites):
        missing = [s.key for s in sites if s.key not in maps]
        raise ActivationError(f"sites never reached in the forward pass: {missing[:5]}")
    return ordered, FitReport(infos, support)
