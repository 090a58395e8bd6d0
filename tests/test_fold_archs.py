"""Baked checkpoint (reloaded from disk by plain transformers) ≡ hooked model, for every row of the
site table and every site it declares, at λ ∈ {0.5, 1, 1.7}."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from actmerge import pipeline
from actmerge.errors import NotFoldableError
from actmerge.kinds.llm.hooks import steer
from actmerge.models import ModelSource
from actmerge.sites import architecture_for

from .common import MODEL_TYPES, TOLERANCE, load, make_pico, random_ids, random_maps, stable_seed

STRENGTHS = [0.5, 1.0, 1.7]
CASES = [(mt, site) for mt in MODEL_TYPES for site in architecture_for(mt).sites]


@pytest.fixture(scope="module")
def picos(tmp_path_factory):
    root = tmp_path_factory.mktemp("picos")
    return {mt: make_pico(mt, root / mt, seed=i) for i, mt in enumerate(MODEL_TYPES)}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize(("model_type", "site"), CASES, ids=[f"{m}-{s}" for m, s in CASES])
def test_baked_equals_hooked(picos, tmp_path, model_type, site):
    src = ModelSource(model_type, picos[model_type])
    maps = random_maps(src.config, [site], seed=stable_seed(site))
    base = load(src.path)
    ids = random_ids()
    for lam in STRENGTHS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (res,) = pipeline.bake(
                pipeline.Loaded(src),
                maps=maps,
                options=pipeline.BakeOptions(strengths=[lam], out=tmp_path / f"out-{lam}"),
                progress=False,
                log=lambda *_: None,
            )
        with steer(base, maps, lam):
            ref = _logits(base, ids)
        baked = load(res.out)
        diff = (ref - _logits(baked, ids)).abs().max().item()
        assert diff <= TOLERANCE[torch.float32], f"{model_type}/{site} λ={lam}: max |Δlogit| {diff:.2e}"
        # the maps must really change the model, or the test proves nothing
        assert (ref - _logits(base, ids)).abs().max().item() > 1e-3
        # config changes only where the plan said so
        cfg_out = json.loads((res.out / "config.json").read_text())
        cfg_src = src.config
        changed = {k for k in cfg_out if cfg_out.get(k) != cfg_src.get(k)} | {
            k for k in cfg_src if k not in cfg_out
        }
        assert changed == {k.split(".")[0] for k in res.plan.config_patch}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_all_sites_together_and_lambda_zero_bit_identical(picos, tmp_path, model_type):
    src = ModelSource(model_type, picos[model_type])
    maps = random_maps(src.config)
    (res,) = pipeline.bake(
        pipeline.Loaded(src),
        maps=maps,
        options=pipeline.BakeOptions(strengths=[0.0], out=tmp_path / "zero"),
        progress=False,
        log=lambda *_: None,
    )
    for f in src.safetensors_files():
        assert (res.out / f.name).read_bytes() == f.read_bytes()
    assert (res.out / "config.json").read_bytes() == (src.path / "config.json").read_bytes()
    (res,) = pipeline.bake(
        pipeline.Loaded(src),
        maps=maps,
        options=pipeline.BakeOptions(strengths=[1.0], out=tmp_path / "one"),
        progress=False,
        log=lambda *_: None,
    )
    base = load(src.path)
    ids = random_ids(seed=1)
    with steer(base, maps, 1.0):
        ref = _logits(base, ids)
    assert (ref - _logits(load(res.out), ids)).abs().max().item() <= TOLERANCE[torch.float32]


@pytest.mark.parametrize(
    ("model_type", "site"),
    [
        ("mistral", "attn_in"),
        ("gemma3_text", "attn_post"),
        ("gemma3_text", "mlp_hidden"),
        ("phi3", "mlp_in"),
        ("qwen2", "attn_ctx"),
    ],
)
def test_unfoldable_shift_refused_then_dropped(picos, tmp_path, model_type, site):
    src = ModelSource(model_type, picos[model_type])
    maps = random_maps(src.config, [site], seed=3)
    g = torch.Generator().manual_seed(0)
    for m in maps.maps.values():  # add shifts where none can fold
        m.beta.copy_(0.2 * torch.randn(m.dim, generator=g))
    with pytest.raises(NotFoldableError, match="shift-policy drop"):
        pipeline.bake(
            pipeline.Loaded(src),
            maps=maps,
            options=pipeline.BakeOptions(strengths=[1.0], out=tmp_path / "x"),
            progress=False,
            log=lambda *_: None,
        )
    assert not (tmp_path / "x").exists()
    (res,) = pipeline.bake(
        pipeline.Loaded(src),
        maps=maps,
        options=pipeline.BakeOptions(strengths=[1.0], out=tmp_path / "drop", shift_policy="drop"),
        progress=False,
        log=lambda *_: None,
    )
    assert res.deviation is not None and res.deviation.max_abs_logit_diff > 0
    base = load(src.path)
    ids = random_ids()
    held = pipeline.baked_maps(maps, res.plan)
    with steer(base, held, 1.0):
        ref = _logits(base, ids)
    assert (ref - _logits(load(res.out), ids)).abs().max().item() <= TOLERANCE[torch.float32]


def test_target_restricts_plan(picos, tmp_path):
    src = ModelSource("qwen3", picos["qwen3"])
    maps = random_maps(src.config, ["attn_ctx"], seed=4)
    with pytest.raises(NotFoldableError, match="vllm"):
        pipeline.bake(
            pipeline.Loaded(src),
            maps=maps,
            options=pipeline.BakeOptions(strengths=[1.0], targets=["vllm"], dry_run=True),
            progress=False,
            log=lambda *_: None,
        )
    (res,) = pipeline.bake(
        pipeline.Loaded(src),
        maps=maps,
        options=pipeline.BakeOptions(strengths=[1.0], targets=["transformers"], dry_run=True),
        progress=False,
        log=lambda *_: None,
    )
    assert res.plan.config_patch == {"attention_bias": True}
    maps = random_maps(src.config, ["attn_in"], seed=5)
    (res,) = pipeline.bake(
        pipeline.Loaded(src),
        maps=maps,
        options=pipeline.BakeOptions(strengths=[1.0], targets=["vllm", "llama.cpp"], dry_run=True),
        progress=False,
        log=lambda *_: None,
    )
    assert "llama.cpp" in res.plan.runtimes
