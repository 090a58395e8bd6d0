"""LinEAS on the real Gemma-3-270M (slow; runs in CI): a short fold-aware fit lowers its loss, bakes
exactly with config.json unchanged, and the checkpoint matches the hooked maps in a fresh process."""

import json

import pytest

from actmerge import pipeline
from actmerge.models import resolve
from actmerge.recipe import load_recipe

pytestmark = pytest.mark.slow


def test_lineas_fold_aware_bake(tmp_path):
    recipe = load_recipe("detox-lineas")
    short = recipe.with_lineas(steps=12, batch=16)
    loaded = pipeline.Loaded(resolve("gemma-3-270m"))
    res = pipeline.fit(loaded, short, progress=False, log=lambda *_: None)
    rep = res.report
    assert sum(rep.losses[-3:]) < sum(rep.losses[:3])  # the loss goes down
    # fold-aware: every shift is frozen (post-norms have no bias; attn_ctx would need attention_bias)
    assert len(rep.frozen) == len(res.maps.maps) == 54
    assert all(float(m.beta.abs().max()) == 0.0 for m in res.maps.maps.values())
    (bake,) = pipeline.bake(
        loaded,
        maps=res.maps,
        options=pipeline.BakeOptions(strengths=[1.0], out=tmp_path / "o"),
        progress=False,
        log=lambda *_: None,
    )
    assert json.loads((tmp_path / "o" / "config.json").read_text()) == loaded.source.config
    assert {sp.exactness for sp in bake.plan.sites} <= {"exact", "identity"}
    ver = pipeline.verify(tmp_path / "o", log=lambda *_: None)
    assert ver.passed and ver.max_abs_logit_diff <= 1e-3
