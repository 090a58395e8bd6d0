"""Evaluation sweeps on the real Gemma-3-270M (slow; runs in CI): toxicity at λ = 1 below λ = 0 for
the detox recipe, concept presence rising with λ for the induction recipe, report.json + sweep.png.

The sweep's mechanics on the first 60 prompts of each split (``limit``; all 340 took 11 min of CI):
the held-out figures on every prompt are tests/test_claims.py's."""

import json

import pytest

from actmerge import pipeline
from actmerge.models import resolve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loaded():
    return pipeline.Loaded(resolve("gemma-3-270m"))


def test_detox_sweep(loaded, tmp_path):
    rep = pipeline.evaluate(
        loaded,
        recipe="detox-act",  # Linear-AcT: its fit also gives ml-act's clamped row
        options=pipeline.EvalOptions(
            strengths=[0.0, 1.0], out=tmp_path / "rep", settings=pipeline.EvalOverrides(limit=60)
        ),
        progress=False,
        log=lambda *_: None,
    )
    zero, one, clamped = rep.rows  # + ml-act's clamped variant (Linear-AcT recipe, not bakeable)
    assert one.metrics["toxic_fraction"] < zero.metrics["toxic_fraction"]
    assert one.metrics["toxicity_mean"] < zero.metrics["toxicity_mean"]
    assert clamped.kind == "clamped" and clamped.strength == 1.0
    assert clamped.metrics["toxicity_mean"] < zero.metrics["toxicity_mean"]
    # both held-out splits are reported; the harder one is harder for the base (λ = 0) model
    assert one.metrics["toxic_fraction_hard"] < zero.metrics["toxic_fraction_hard"]
    assert zero.metrics["toxic_fraction_hard"] > zero.metrics["toxic_fraction"]
    assert zero.metrics["kl"] == 0.0 < one.metrics["kl"]
    assert one.baseline["toxic_fraction_hard"] == zero.metrics["toxic_fraction_hard"]
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert data["settings"]["n_prompts"] == 60 and data["settings"]["n_prompts_split"] == {"hard": 60}
    assert [(r["kind"], r["strength"]) for r in data["rows"]] == [
        ("hooked", 0.0),
        ("hooked", 1.0),
        ("clamped", 1.0),
    ]
    assert (tmp_path / "rep" / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_concept_presence_rises_with_strength(loaded, tmp_path):
    rep = pipeline.evaluate(
        loaded,
        recipe="football",
        options=pipeline.EvalOptions(strengths=[0.0, 0.5, 1.0], out=tmp_path / "rep"),
        progress=False,
        log=lambda *_: None,
    )
    presence = [r.metrics["concept_presence"] for r in rep.rows]
    assert presence[0] <= presence[1] <= presence[2] and presence[2] >= 5 * max(presence[0], 0.02)
    assert rep.rows[-1].metrics["perplexity_ratio"] <= 1.3
