"""LinEAS: end-to-end affine steering with a distributional loss (docs/design.md §2), fold-aware.

Every chosen site gets per-neuron ``ω`` (init 1) and ``β`` (init 0). A step runs a batch of source
sentences through the frozen model *with the maps active* and compares, per neuron, the pooled
activations at every site with pooled activations of target sentences under the *unmodified*
model (collected once): 1-D squared Wasserstein distance between the two samples (sorted samples;
quantile matching when the counts differ), averaged over neurons, then over sites. Gradients flow
through the whole model, so later maps account for earlier ones.

Fold-aware: parameters that the fold plan cannot bake for this architecture and target runtimes
(e.g. shifts at Gemma's sandwich post-norms, or shifts needing a config flag when config changes
are disallowed) are frozen at their identity value, and the end-to-end loss lets the foldable
parameters compensate. Optional sparsity by proximal steps after each Adam step, as ml-lineas'
``apply_sparse_group_lasso`` (``lineas/utils/proximal.py``): L1 soft-threshold on ``ω − 1`` and on
``β`` (neuron selection), then group-L2 shrinkage with a threshold ∝ √d of two groups per site,
``ω − 1`` and ``β`` separately (site selection); ``group_mode="joint"`` (actmerge's variant)
shrinks ``[ω − 1, β]`` as one group.

Differences from ml-lineas that remain (docs/differences.md):
the loss averages over samples (the reference sums over the batch: only a constant factor, which
Adam's update ignores); with fewer target samples than the batch, target quantiles are
interpolated (the reference refuses such a batch).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from rich.progress import Progress

from . import distributed
from .errors import ActivationError, PlacementError
from .kinds.llm.collect import Batch, CollectOptions, batches, collect_sharded
from .kinds.llm.hooks import Pooler, attach
from .lineas_ops import StepLoss, WideAffine, prox_
from .maps import AffineMap
from .placement import offloaded
from .sites import Site


@dataclass(frozen=True)
class LineasConfig:
    steps: int = 1000
    lr: float = 1e-3
    lr_min: float = 1e-6  # cosine schedule floor
    batch: int = 32  # source sentences per step (and target samples per step)
    l1: float = 0.0  # sparsity: L1 on (ω − 1) and β
    group: float = 0.0  # sparsity: group-L2 per site (threshold ∝ √d)
    group_mode: str = "separate"  # separate: ω−1 and β are two groups per site (ml-lineas); joint: one
    loss_norm: str = "none"  # none | target_var: per-neuron W2 divided by the target's variance
    param: str = "linear"  # linear: learn ω; log: learn θ with ω = exp(θ)
    seed: int = 0
    # early stop (off with 0): stop once the mean loss of the last `early_stop` steps is less than
    # `early_stop_tol` (relative) below that of the window before; the cosine schedule still spans
    # `steps`, so a stopped fit differs from a full one (its maps are those of the stopping step)
    early_stop: int = 0
    early_stop_tol: float = 1e-3

    @classmethod
    def from_options(cls, options, seed: int = 0) -> LineasConfig:
        """From a recipe's ``lineas:`` block (``recipe.LineasOptions``, the same fields) and its seed."""
        return cls(**options.model_dump(), seed=seed)


@dataclass
class LineasReport:
    losses: list[float]
    frozen: dict[str, str]  # site key → why its shift was frozen
    selected_neurons: int
    total_neurons: int
    selected_sites: int
    seconds: float
    steps: int
    per_site_active: dict[str, int] = field(default_factory=dict)
    steps_per_second: float = 0.0
    stopped_early: bool = False


def fit_lineas(
    model,
    tok,
    sites: list[Site],
    source: list[str],
    target: list[str],
    *,
    frozen_shift: dict[str, str],
    cfg: LineasConfig = LineasConfig(),
    collection: CollectOptions = CollectOptions(),
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, AffineMap], LineasReport]:
    """Learn ω, β at ``sites`` end to end. ``frozen_shift``: site key → reason its β stays 0.
    ``target``: target sentences, or their pooled activations ``{key: [M, D]}`` collected already.
    ``collection``: how sentences are cut and pooled (its ``batch_size``: that of collecting the target
    rows; a step takes ``cfg.batch`` source sentences).

    A step is one forward + backward of the steered batch and little else: the source sentences are
    tokenised once (a step selects rows), the forward runs without a KV cache and stops after the
    last site, the loss of all sites is one sort and one weighted sum over their concatenated
    neurons, and the loss reaches the host only every few steps on an accelerator.

    Under torchrun / accelerate launch the step's sentences are dealt over the processes, each runs
    the forward and backward of its share, and the gradients are summed (``distributed``): the same
    seed gives every process the same batches and maps, those of one process."""
    t0 = time.perf_counter()
    progress = progress and distributed.is_main()
    ranks = distributed.world()[1]
    if min(cfg.batch, len(source)) < ranks:
        raise PlacementError(
            f"LinEAS batch of {min(cfg.batch, len(source))} sentences cannot be shared by {ranks} "
            f"processes: launch at most that many, or raise lineas.batch / the sentence count."
        )
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = next(model.parameters()).device
    keys = [s.key for s in sites]
    if isinstance(target, dict):
        tgt = target
    else:
        tgt = collect_sharded(
            model,
            tok,
            target,
            keys,
            **collection.kwargs(),
            desc="target activations",
            progress=progress,
        )
    tgt = {k: v.to(device) for k, v in tgt.items()}
    n_target = len(next(iter(tgt.values())))
    if cfg.loss_norm not in ("none", "target_var", "target_std"):  # target_std: deprecated alias
        raise ValueError(f"unknown loss_norm {cfg.loss_norm!r}: use 'none' or 'target_var'")
    if cfg.param not in ("linear", "log"):
        raise ValueError(f"unknown LinEAS parametrisation {cfg.param!r}: use 'linear' or 'log'")
    log_param = cfg.param == "log"
    identity = 0.0 if log_param else 1.0  # parameter value of the identity scale
    # the maps, their gradients and Adam's state in float64 (float32 where the device has no float64):
    # a gradient summed over rows in float64 is the same whichever process summed which rows, so data-
    # parallel ranks take the one-process steps (float32 sums differ by rounding, which the sorts of
    # later steps amplify: ~1e-3 after 40 steps on Gemma)
    pdtype = torch.float32 if device.type == "mps" else torch.float64
    params: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for k in keys:
        d = tgt[k].shape[1]
        omega = torch.full((d,), identity, dtype=pdtype, device=device, requires_grad=True)
        beta = torch.zeros(d, dtype=pdtype, device=device, requires_grad=k not in frozen_shift)
        params[k] = (omega, beta)
    trainable = [p for om, be in params.values() for p in (om, be) if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=cfg.lr, betas=(0.9, 0.9))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.steps, 1), eta_min=cfg.lr_min)
    for p in model.parameters():
        p.requires_grad_(False)
    loss_of = StepLoss(
        tgt, keys, cfg.loss_norm, n_source=min(cfg.batch, len(source)), fixed=n_target <= cfg.batch
    )
    src = _Tokenised(tok, source, collection.max_tokens, collection.skip_special, device)
    pooler = Pooler(collection.pooling)
    pooled: dict[str, torch.Tensor] = {}
    order: list[str] = []  # the sites in the order the first forward reached them
    first = True

    def make(key: str):
        omega, beta = params[key]
        shift = beta.requires_grad  # a frozen shift stays 0: adding it would change nothing

        def fn(a: torch.Tensor) -> torch.Tensor:
            scale = omega.exp() if log_param else omega
            out = WideAffine.apply(a, scale, beta if shift else None)
            pooled[key] = pooler(out)
            if first:
                order.append(key)
            return out

        return fn

    # losses reach the host (a sync on an accelerator) every `every` steps, where they are checked
    every = 1 if device.type == "cpu" else 20
    losses: list[float] = []
    pending: list[torch.Tensor] = []
    stopped_early = False
    t_loop = time.perf_counter()
    with ExitStack() as stack, Progress(transient=True, disable=not progress) as bar:
        for k in keys:
            stack.enter_context(attach(model, k, make(k)))
        task = bar.add_task("LinEAS", total=cfg.steps)
        # no live bar off a terminal (CI logs, nohup): a plain line every tenth of the fit instead
        plain_every = max(1, cfg.steps // 10) if progress and not bar.console.is_terminal else 0
        for step in range(cfg.steps):
            rows = rng.sample(range(len(source)), min(cfg.batch, len(source)))
            idx = rng.sample(range(n_target), min(cfg.batch, n_target))
            shares = distributed.deal(rows)  # [rows] in one process
            b = src.rows(shares[distributed.world()[0]], width=src.width(rows))
            pooler.mask = b.token_mask
            pooled.clear()
            _forward(model, b.inputs)
            if first:
                first = False
                stop = _last_site(model, order, keys)
                if stop is not None:  # after the steering hook at that site (hooks run in order)
                    stack.enter_context(attach(model, stop, _raise_stop))
            mine = torch.cat([pooled[k] for k in keys], 1)
            loss = loss_of(distributed.join_rows(mine, [len(s) for s in shares]), idx)
            pending.append(loss.detach())
            if (step + 1) % every == 0 or step + 1 == cfg.steps:
                losses += _drain_losses(pending, len(losses))
                stopped_early = _plateaued(losses, cfg.early_stop, cfg.early_stop_tol)
                bar.update(task, description=f"LinEAS loss {losses[-1]:.4g}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            distributed.all_reduce_grads(trainable)
            opt.step()
            lr = opt.param_groups[0]["lr"]
            sched.step()
            if cfg.l1 > 0 or cfg.group > 0:
                for k, (om, be) in params.items():
                    prox_(
                        om,
                        be,
                        l1=cfg.l1,
                        group=cfg.group,
                        lr=lr,
                        beta_trainable=k not in frozen_shift,
                        identity=identity,
                        group_mode=cfg.group_mode,
                    )
            bar.update(task, advance=1)
            if plain_every and (step + 1) % plain_every == 0 and step + 1 < cfg.steps:
                rate = (step + 1) / max(time.perf_counter() - t_loop, 1e-9)
                last = f"loss {losses[-1]:.4g}, " if losses else ""
                log(
                    f"[actmerge] LinEAS step {step + 1}/{cfg.steps}: {last}{rate:.2f} steps/s, "
                    f"~{(cfg.steps - step - 1) / rate:.0f} s left"
                )
            if stopped_early:
                break
    losses += _drain_losses(pending, len(losses))
    steps_per_second = len(losses) / max(time.perf_counter() - t_loop, 1e-9)
    maps = {
        k: AffineMap(
            (om.detach().exp() if log_param else om.detach()).float().cpu(), be.detach().float().cpu()
        )
        for k, (om, be) in params.items()
    }
    active = {k: int(((m.omega != 1) | (m.beta != 0)).sum()) for k, m in maps.items()}
    report = LineasReport(
        losses,
        dict(frozen_shift),
        sum(active.values()),
        sum(m.dim for m in maps.values()),
        sum(1 for v in active.values() if v > 0),
        time.perf_counter() - t0,
        len(losses),
        active,
        steps_per_second,
        stopped_early,
    )
    early = f" (stopped early: loss plateau, early_stop={cfg.early_stop})" if stopped_early else ""
    log(
        f"LinEAS: {report.steps} steps in {report.seconds:.0f}s ({steps_per_second:.2f} steps/s){early}, "
        f"loss {losses[0]:.4g} → {losses[-1]:.4g}; "
        f"selected {report.selected_neurons}/{report.total_neurons} neurons at {report.selected_sites}/{len(keys)} "
        f"sites; shifts frozen (not foldable) at {len(frozen_shift)} sites"
    )
    return maps, report


class _Tokenised:
    """The source sentences tokenised once, left-padded to the longest; ``rows`` gives the batch
    that tokenising those sentences alone would give (their rows, cropped to their longest)."""

    def __init__(self, tok, sentences: list[str], max_tokens: int, skip_special: bool, device):
        (b,) = batches(
            tok,
            sentences,
            batch_size=len(sentences),
            max_tokens=max_tokens,
            skip_special=skip_special,
            device=device,
        )
        self.inputs, self.mask = b.inputs, b.token_mask.to(device)
        self.lengths = b.inputs["attention_mask"].sum(1).tolist()
        self.device = device

    def width(self, rows: list[int]) -> int:
        return max(self.lengths[r] for r in rows)

    def rows(self, rows: list[int], width: int | None = None) -> Batch:
        """Those sentences' batch; ``width``: padded to it (≥ theirs), as in a larger batch."""
        width = width or self.width(rows)
        sel = torch.tensor(rows, device=self.device)
        inputs = {k: v.index_select(0, sel)[:, -width:] for k, v in self.inputs.items()}
        return Batch(inputs, self.mask.index_select(0, sel)[:, -width:])


class _Stop(Exception):
    """Raised by a hook after the last site the loss needs: the rest of the forward is not run."""


def _raise_stop(_a: torch.Tensor) -> None:
    raise _Stop


def _forward(model, inputs: dict[str, torch.Tensor]) -> None:
    """The body (no LM head) without a KV cache; a hook may end it early with ``_Stop``."""
    try:
        model.base_model(**inputs, use_cache=False)
    except _Stop:
        pass


def _last_site(model, order: list[str], keys: list[str]) -> str | None:
    """The site after which a forward may stop: the last one the first forward reached, when each
    site ran exactly once; none on a model dispatched by accelerate (its offload hooks must run)."""
    if sorted(order) != sorted(keys) or offloaded(model):
        return None
    return order[-1]


def _drain_losses(pending: list[torch.Tensor], first_step: int) -> list[float]:
    """The pending step losses as floats (one host transfer); a non-finite one is an error."""
    if not pending:
        return []
    values = torch.stack(pending).tolist()
    pending.clear()
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise ActivationError(
                f"LinEAS loss became {v} at step {first_step + i}: lower lr or use loss_norm: target_var."
            )
    return values


def _plateaued(losses: list[float], window: int, tol: float) -> bool:
    """Early stop: the mean loss of the last ``window`` steps is less than ``tol`` (relative) below
    the mean of the ``window`` steps before. ``window`` 0: never."""
    if window <= 0 or len(losses) < 2 * window:
        return False
    last = sum(losses[-window:]) / window
    before = sum(losses[-2 * window : -window]) / window
    return before - last <= tol * abs(before)
