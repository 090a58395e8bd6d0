"""Activation collection and map fitting over prompt sets.

Memory grows with sentences × dims (one pooled vector per sentence per site), never with tokens.
Forward passes run through ``model.base_model`` so the (large) LM head is never computed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from ... import distributed
from ...errors import ActivationError
from ...estimators import ESTIMATORS, FitInfo, equal_counts, keep_top
from ...maps import AffineMap
from ...placement import input_device
from ...progress import bar
from ...sites import Site
from .hooks import Pooler, affine_fn, attach, clamped_fn, record, split_key


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
    skip_special: bool = False,
    device: str | torch.device = "cpu",
) -> Iterator[Batch]:
    """Left-padded, truncated batches with the mask of tokens to pool: every real token (padding
    excluded, BOS kept: ml-act's ``pooling_ops.py``), or with ``skip_special`` every non-special one.

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
    skip_special: bool = False,
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
    pending = batches(
        tok,
        sentences,
        batch_size=batch_size,
        max_tokens=max_tokens,
        skip_special=skip_special,
        device=input_device(model),
    )
    with record(model, keys, pooler) as store, bar(pending, n_batches, desc, progress) as todo:
        for b in todo:
            pooler.mask = b.token_mask
            model.base_model(**b.inputs)
            row = _drain(store, out, row, len(sentences))
    return out


def collect_sharded(
    model, tok, sentences: list[str], keys: list[str], *, batch_size: int = 16, **opts
) -> dict[str, torch.Tensor]:
    """``collect`` over all ``sentences``. Under torchrun / accelerate launch each process pools only its
    share of the batches (``distributed.shard``: the same batches one process would run) and every
    process gets all the rows, in sentence order (``distributed.gather_rows``)."""
    mine = distributed.shard(len(sentences), batch_size)
    if len(mine) == len(sentences):
        return collect(model, tok, sentences, keys, batch_size=batch_size, **opts)
    share = [sentences[i] for i in mine]
    rows = collect(model, tok, share, keys, batch_size=batch_size, **opts) if share else {}
    return distributed.gather_rows(rows, keys, len(sentences), batch_size)


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
    # source support per site, (min, max) of the pooled source values the map was fitted on (the
    # balanced subset by default, as ml-act's ``compute_quantiles``): ml-act's clamp (hooks.steer)
    support: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def degenerate(self) -> int:
        return sum(i.degenerate for i in self.per_site.values())


@dataclass(frozen=True)
class CollectOptions:
    """How sentences become pooled rows: ``batch_size`` sentences a forward, each cut to ``max_tokens``
    tokens, pooled by ``pooling`` (``skip_special``: special tokens are not pooled)."""

    batch_size: int = 16
    max_tokens: int = 128
    pooling: str = "mean"
    skip_special: bool = False

    def kwargs(self) -> dict:
        """These settings as ``collect``'s keywords."""
        return dict(
            batch_size=self.batch_size,
            max_tokens=self.max_tokens,
            pooling=self.pooling,
            skip_special=self.skip_special,
        )


@dataclass(frozen=True)
class FitOptions:
    """How ``fit`` fits the maps (defaults: ml-act's computation, see estimators.py for the options).

    ``method``: an ``estimators.ESTIMATORS`` name; ``fit_shift``, ``degenerate``, ``sample`` and
    ``seed`` go to the estimator. ``incremental``: the paper's mode (see ``fit``), with
    ``incremental_clamp`` and ``incremental_order``. ``top_neurons`` < 1: each map keeps only that
    fraction of its neurons (``estimators.keep_top``)."""

    method: str = "linear_act"
    incremental: bool = False
    fit_shift: bool = True
    degenerate: str = "skip"
    sample: str = "balanced"
    incremental_clamp: bool | None = None
    incremental_order: str = "modules"
    top_neurons: float = 1.0
    seed: int = 0

    def estimator_kwargs(self) -> dict:
        """The estimator's keywords."""
        return dict(seed=self.seed, fit_shift=self.fit_shift, degenerate=self.degenerate, sample=self.sample)

    def clamp(self) -> bool:
        """Whether earlier maps are clamped to their source support in incremental mode (``None``: the
        reference's per method)."""
        return (self.method == "linear_act") if self.incremental_clamp is None else self.incremental_clamp


def fit(
    model,
    tok,
    sites: list[Site],
    source: list[str],
    target: list[str],
    *,
    options: FitOptions = FitOptions(),
    collection: CollectOptions = CollectOptions(),
    progress: bool = True,
) -> tuple[dict[str, AffineMap], FitReport]:
    """Fit one map per site as ``options`` say, on activations pooled as ``collection`` says.

    Incremental mode (the paper's, ml-act ``learn_intervention_all_incremental``): sites one at a
    time, each fitted on activations computed with every earlier map active at λ = 1, for source and
    target alike. ``incremental_order="modules"`` (reference): the order of ``model.named_modules()``
    (inside a layer: attention, MLP, then the norms — o_proj before input_layernorm);
    ``"forward"``: the order the forward pass reaches the sites. ``incremental_clamp`` (None = the
    reference's per method: clamped for linear_act, whose config uses ``quantiles_src: q_0_100``,
    unclamped for gaussian_act/mean_act, ``q_all``): earlier maps move only values strictly inside
    their source support. ``top_neurons`` < 1: each map keeps only that fraction of its neurons
    (``estimators.keep_top``); incremental fitting sees the sparsified earlier maps."""
    ESTIMATORS[options.method]  # an unknown method fails before any forward
    keys = [s.key for s in sites]
    if len(set(keys)) != len(keys):
        raise ActivationError("the same module/side is selected twice; list each site once.")
    opts = dict(collection.kwargs(), progress=progress and distributed.is_main())
    if not options.incremental:
        src = collect_sharded(model, tok, source, keys, desc="source sentences", **opts)
        tgt = collect_sharded(model, tok, target, keys, desc="target sentences", **opts)
        maps: dict[str, AffineMap] = {}
        infos: dict[str, FitInfo] = {}
        support = {}
        for key in keys:
            maps[key], infos[key], support[key] = _fit_site(src[key], tgt[key], options)
        return maps, FitReport(infos, support)
    order = _incremental_order(model, tok, keys, source, options.incremental_order, opts)
    return _fit_incremental(model, tok, order, keys, source, target, options, opts)


def _fit_site(src: torch.Tensor, tgt: torch.Tensor, options: FitOptions):
    """Fit one site, keeping the ``top_neurons`` fraction of its neurons; the support is taken from the
    source rows the map is fitted on."""
    if options.sample == "balanced":
        src, tgt = equal_counts(src, tgt, options.seed)
    amap, info = ESTIMATORS[options.method](src, tgt, **options.estimator_kwargs())
    amap = keep_top(amap, src, options.top_neurons)
    return amap, info, (src.min(0).values, src.max(0).values)


def _incremental_order(model, tok, keys: list[str], source: list[str], order: str, opts: dict) -> list[str]:
    if order == "modules":
        position = {name: i for i, (name, _) in enumerate(model.named_modules())}

        def rank(key: str) -> tuple[int, int]:
            module, side = split_key(key)
            if module not in position:
                raise ActivationError(f"the model has no module {module!r} (from {key!r}).")
            return position[module], 0 if side == "input" else 1

        return sorted(keys, key=rank)
    if order != "forward":
        raise ActivationError(f"unknown incremental order {order!r}: use 'modules' or 'forward'.")
    seen: list[str] = []

    def make(key: str):
        def fn(_a: torch.Tensor) -> None:
            if key not in seen:
                seen.append(key)

        return fn

    (b,) = list(
        batches(
            tok,
            source[:1],
            batch_size=1,
            max_tokens=opts["max_tokens"],
            skip_special=opts["skip_special"],
            device=input_device(model),
        )
    )
    with torch.no_grad(), ExitStack() as stack:
        for key in keys:
            stack.enter_context(attach(model, key, make(key)))
        model.base_model(**b.inputs)
    if len(seen) != len(keys):
        missing = [k for k in keys if k not in seen]
        raise ActivationError(f"sites never reached in the forward pass: {missing[:5]}")
    return seen


def _fit_incremental(model, tok, order, keys, source, target, options: FitOptions, opts: dict):
    """One site at a time in ``order``: collect its pooled source and target activations (in
    batches of ``batch_size``) with every map fitted so far active at λ = 1 (clamped to its source
    support when ``options.clamp()``), fit, move on. Costs one pass over the sentences per site."""
    clamp = options.clamp()
    maps: dict[str, AffineMap] = {}
    infos: dict[str, FitInfo] = {}
    support: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    quiet = {**opts, "progress": False}
    with bar(order, len(order), "incremental fit", opts["progress"]) as todo:
        for key in todo:
            with ExitStack() as stack:
                for done, m in maps.items():
                    fn = clamped_fn(m.omega, m.beta, *support[done]) if clamp else affine_fn(m.omega, m.beta)
                    stack.enter_context(attach(model, done, fn))
                src = collect_sharded(model, tok, source, [key], **quiet)[key]
                tgt = collect_sharded(model, tok, target, [key], **quiet)[key]
            maps[key], infos[key], support[key] = _fit_site(src, tgt, options)
    return {k: maps[k] for k in keys}, FitReport({k: infos[k] for k in keys}, {k: support[k] for k in keys})
