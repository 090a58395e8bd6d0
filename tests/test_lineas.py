"""LinEAS: the loss, gradients and freezing, the proximal steps, recovery of a known transport,
and composition of recipes."""

import itertools
from contextlib import ExitStack
from dataclasses import replace

import pytest
import torch

from actmerge import pipeline
from actmerge.errors import ActivationError
from actmerge.kinds.llm.collect import collect
from actmerge.kinds.llm.hooks import steer
from actmerge.lineas import LineasConfig, fit_lineas
from actmerge.lineas_ops import prox_, w2_per_neuron
from actmerge.maps import AffineMap, MapSet, compose
from actmerge.models import ModelSource
from actmerge.sites import architecture_for, resolve_sites

from .common import char_tokenizer, load, make_pico, random_ids, random_maps

QUIET = dict(progress=False, log=lambda *_: None)
SENTENCES = [f"sentence number {i} says {'abc'[i % 3] * (i % 5 + 1)}." for i in range(40)]


def test_w2_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g) * 2 + 1
    brute = torch.stack(
        [
            min(((x[:, j] - y[list(p), j]) ** 2).mean() for p in itertools.permutations(range(6)))
            for j in range(3)
        ]
    )
    assert torch.allclose(w2_per_neuron(x, y), brute, atol=1e-6)
    # unequal counts: duplicating every target sample leaves the distribution (and W2) unchanged
    assert torch.allclose(w2_per_neuron(x, y.repeat(2, 1)), w2_per_neuron(x, y), atol=0.3)
    assert float(w2_per_neuron(x, x.repeat(3, 1)).max()) < 0.05


def test_prox_steps_zero_what_thresholds_say():
    omega, beta = torch.tensor([1.05, 1.5, 0.98]), torch.tensor([0.01, -0.4, 0.0])
    prox_(omega, beta, l1=1.0, group=0.0, lr=0.1, beta_trainable=True)  # threshold 0.1
    assert torch.allclose(omega, torch.tensor([1.0, 1.4, 1.0])) and torch.allclose(
        beta, torch.tensor([0.0, -0.3, 0.0])
    )
    omega2, beta2 = torch.tensor([1.01, 0.99]), torch.tensor([0.01, 0.0])
    prox_(omega2, beta2, l1=0.0, group=1.0, lr=0.1, beta_trainable=True)  # ‖v‖ = 0.017 < 0.1·√2
    assert torch.equal(omega2, torch.ones(2)) and torch.equal(beta2, torch.zeros(2))
    omega3, beta3 = torch.tensor([3.0, 1.0]), torch.tensor([0.0, 0.0])
    prox_(omega3, beta3, l1=0.0, group=1.0, lr=0.1, beta_trainable=True)
    assert 1.0 < float(omega3[0]) < 3.0  # shrunk, not zeroed


@pytest.fixture(scope="module")
def pico(tmp_path_factory):
    return make_pico("gemma3_text", tmp_path_factory.mktemp("ln") / "g")


def _sites(path, names):
    cfg = ModelSource("p", path).config
    return resolve_sites(architecture_for(cfg), cfg, names, "all")


def test_gradients_and_frozen_shifts(pico):
    model, tok = load(pico), char_tokenizer()
    sites = _sites(pico, ["attn_ctx", "mlp_post"])
    frozen = {s.key: "no bias" for s in sites if s.name == "mlp_post"}
    maps, rep = fit_lineas(
        model,
        tok,
        sites,
        SENTENCES[:20],
        SENTENCES[20:],
        frozen_shift=frozen,
        cfg=LineasConfig(steps=3, lr=1e-2, batch=8),
        **QUIET,
    )
    for key, m in maps.items():
        assert (m.omega != 1).all(), key  # every ω got gradient and moved
        if key in frozen:
            assert torch.equal(m.beta, torch.zeros_like(m.beta))  # frozen shifts never move
        else:
            assert (m.beta != 0).all()
    assert rep.frozen == frozen and len(rep.losses) == 3
    assert all(not p.requires_grad for p in model.parameters())


def test_recovers_a_known_transport(pico):
    model, tok = load(pico), char_tokenizer()
    (site,) = _sites(pico, ["attn_in"])[:1]
    g = torch.Generator().manual_seed(1)
    dim = 32
    truth = AffineMap(1 + 0.5 * torch.rand(dim, generator=g), 0.3 * torch.randn(dim, generator=g))
    with steer(model, MapSet({site.key: truth}), 1.0):  # targets: the same sentences, transported
        tgt = collect(model, tok, SENTENCES, [site.key], progress=False)
    src = collect(model, tok, SENTENCES, [site.key], progress=False)[site.key]
    maps, rep = fit_lineas(
        model,
        tok,
        [site],
        SENTENCES,
        tgt,
        frozen_shift={},
        cfg=LineasConfig(steps=300, lr=5e-2, lr_min=1e-3, batch=40),
        **QUIET,
    )
    got = maps[site.key]
    assert rep.losses[-1] < 1e-2 * rep.losses[0]
    # the learned map transports the source sample onto the target: (got − truth) vanishes on the data
    err = ((got.omega - truth.omega) * src + (got.beta - truth.beta)).pow(2).mean(0).sqrt()
    assert float((err / tgt[site.key].std(0)).max()) < 0.1
    assert float((got.omega - truth.omega).abs().median()) < 0.02


def test_sparsity_selects_sites(pico):
    model, tok = load(pico), char_tokenizer()
    sites = _sites(pico, ["attn_ctx", "mlp_hidden"])
    maps, rep = fit_lineas(
        model,
        tok,
        sites,
        SENTENCES[:20],
        SENTENCES[20:],
        frozen_shift={},
        cfg=LineasConfig(steps=20, lr=1e-2, batch=8, l1=0.5, group=5.0),
        **QUIET,
    )
    assert rep.selected_neurons < rep.total_neurons
    for m in maps.values():
        assert int(((m.omega != 1) | (m.beta != 0)).sum()) <= m.dim


def test_composed_bake_equals_sequential_hooks(tmp_path):
    path = make_pico("llama", tmp_path / "llama")
    src = ModelSource("p", path)
    a = random_maps(src.config, ["attn_ctx", "mlp_in"], seed=1)
    b = random_maps(src.config, ["attn_ctx", "mlp_hidden"], seed=2)
    composed = pipeline.compose_all([a, b], [1.0, 0.5])
    (res,) = pipeline.bake(
        pipeline.Loaded(src),
        maps=composed,
        options=pipeline.BakeOptions(strengths=[1.0], out=tmp_path / "o"),
        **QUIET,
    )
    base, ids = load(path), random_ids()
    with torch.no_grad():
        with steer(base, a, 1.0), steer(base, b, 0.5):  # b's hooks run after a's at shared sites
            ref = base(input_ids=ids).logits
        got = load(res.out)(input_ids=ids).logits
    assert (ref - got).abs().max().item() <= 1e-4
    assert compose(a, b, (1.0, 0.5)).maps.keys() == composed.maps.keys()


def _reference_fit(model, tok, sites, source, target, frozen, cfg, pooling="mean"):
    """The step loop before the speed work (one tokenisation, sort and loss per site per step, the
    whole body run with a KV cache): the fitted maps must not change."""
    import random

    from actmerge.kinds.llm.collect import batches
    from actmerge.kinds.llm.hooks import Pooler, attach

    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    keys = [s.key for s in sites]
    tgt = target if isinstance(target, dict) else collect(model, tok, target, keys, progress=False)
    n_target = len(next(iter(tgt.values())))
    norm = {k: (v.var(0) + 1e-6) if cfg.loss_norm == "target_std" else None for k, v in tgt.items()}
    ident = 0.0 if cfg.param == "log" else 1.0
    params = {
        k: (
            torch.full((tgt[k].shape[1],), ident, requires_grad=True),
            torch.zeros(tgt[k].shape[1], requires_grad=k not in frozen),
        )
        for k in keys
    }
    opt = torch.optim.Adam(
        [p for pair in params.values() for p in pair if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.9)
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=cfg.lr_min)
    pooler, pooled, losses = Pooler(pooling), {}, []

    def make(key):
        om, be = params[key]

        def fn(a):
            out = a.float() * (om.exp() if cfg.param == "log" else om) + be
            pooled[key] = pooler(out)
            return out

        return fn

    with ExitStack() as stack:
        for k in keys:
            stack.enter_context(attach(model, k, make(k)))
        for _ in range(cfg.steps):
            batch_src = rng.sample(source, min(cfg.batch, len(source)))
            idx = torch.tensor(rng.sample(range(n_target), min(cfg.batch, n_target)))
            (b,) = batches(tok, batch_src, batch_size=len(batch_src), max_tokens=128)
            pooler.mask = b.token_mask
            model.base_model(**b.inputs)
            per_site = []
            for k in keys:
                w2 = w2_per_neuron(pooled[k], tgt[k][idx])
                per_site.append((w2 if norm[k] is None else w2 / norm[k]).mean())
            loss = torch.stack(per_site).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            lr = opt.param_groups[0]["lr"]
            sched.step()
            for k, (om, be) in params.items():
                prox_(
                    om, be, l1=cfg.l1, group=cfg.group, lr=lr, beta_trainable=k not in frozen, identity=ident
                )
            losses.append(float(loss))
    return {
        k: (om.detach().exp() if cfg.param == "log" else om.detach(), be.detach())
        for k, (om, be) in params.items()
    }, losses


@pytest.mark.parametrize(
    "param,loss_norm,n_target",
    [("linear", "none", None), ("log", "target_std", None), ("linear", "target_std", 5)],
)
def test_fitted_maps_equal_the_reference_step(pico, param, loss_norm, n_target):
    """The fast step (one tokenisation, forward cut after the last site, one loss over all sites,
    no per-step host sync) fits the same maps as the plain per-site loop, within float rounding —
    with a subsampled target, and with a target smaller than the batch (quantile interpolation)."""
    model, tok = load(pico), char_tokenizer()
    sites = _sites(pico, ["attn_in", "attn_ctx", "mlp_post"])
    frozen = {s.key: "no bias" for s in sites if s.name == "mlp_post"}
    target = SENTENCES[20:]
    if n_target:  # pooled target activations, fewer than the batch
        target = collect(model, tok, SENTENCES[20 : 20 + n_target], [s.key for s in sites], progress=False)
    cfg = LineasConfig(steps=6, lr=2e-2, batch=8, l1=0.05, group=0.02, loss_norm=loss_norm, param=param)
    maps, rep = fit_lineas(model, tok, sites, SENTENCES[:20], target, frozen_shift=frozen, cfg=cfg, **QUIET)
    ref, ref_losses = _reference_fit(model, tok, sites, SENTENCES[:20], target, frozen, cfg)
    assert rep.losses == pytest.approx(ref_losses, rel=1e-5)
    for key, (omega, beta) in ref.items():
        assert (maps[key].omega - 1).abs().max() > 1e-3  # the maps did move
        assert torch.allclose(maps[key].omega, omega, atol=1e-5, rtol=0), key
        assert torch.allclose(maps[key].beta, beta, atol=1e-5, rtol=0), key
    assert rep.steps == 6 and rep.steps_per_second > 0 and not rep.stopped_early


def test_forward_stops_after_the_last_site_and_leaves_the_model_intact(pico):
    model, tok = load(pico), char_tokenizer()
    ids = random_ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    sites = _sites(pico, ["attn_ctx"])[:1]  # layer 0 only: layer 1 and the final norm are not needed
    calls = {"layer1": 0}
    handle = model.model.layers[1].register_forward_pre_hook(
        lambda *_: calls.__setitem__("layer1", calls["layer1"] + 1)
    )
    fit_lineas(
        model,
        tok,
        sites,
        SENTENCES[:8],
        SENTENCES[8:16],
        frozen_shift={},
        cfg=LineasConfig(steps=3, batch=4),
        **QUIET,
    )
    target_forwards = calls["layer1"]  # the target collection (once) and the first step run it all
    assert target_forwards == 2
    with pytest.raises(ActivationError):  # an error mid-fit (a non-finite loss) still cleans up
        fit_lineas(
            model,
            tok,
            sites,
            SENTENCES[:8],
            SENTENCES[8:16],
            frozen_shift={},
            cfg=LineasConfig(steps=3, batch=4, lr=float("inf")),
            **QUIET,
        )
    handle.remove()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_early_stop_on_a_plateau(pico):
    model, tok = load(pico), char_tokenizer()
    sites = _sites(pico, ["attn_ctx"])
    args = (model, tok, sites, SENTENCES[:20], SENTENCES[20:])
    cfg = LineasConfig(steps=40, lr=1e-3, batch=8)
    _, full = fit_lineas(*args, frozen_shift={}, cfg=cfg, **QUIET)
    assert full.steps == 40 and not full.stopped_early  # off by default
    _, early = fit_lineas(*args, frozen_shift={}, cfg=replace(cfg, early_stop=4, early_stop_tol=0.5), **QUIET)
    assert early.stopped_early and 8 <= early.steps < 40 and len(early.losses) == early.steps
    assert early.losses == full.losses[: early.steps]  # the same trajectory up to the stop


def test_progress_off_a_terminal_is_a_log_line_every_tenth(pico):
    """A fit run under nohup or CI has no live bar: it still reports its progress, as plain lines."""
    model, tok = load(pico), char_tokenizer()
    sites = _sites(pico, ["attn_ctx"])
    lines: list[str] = []
    fit_lineas(
        model, tok, sites, SENTENCES[:20], SENTENCES[20:], frozen_shift={},
        cfg=LineasConfig(steps=20, batch=8), progress=True, log=lines.append,
    )  # fmt: skip
    steps = [line for line in lines if "LinEAS step" in line]
    assert [s.split("step ")[1].split(":")[0] for s in steps] == [f"{k}/20" for k in range(2, 20, 2)]
    assert all("steps/s" in s and "loss" in s for s in steps)
