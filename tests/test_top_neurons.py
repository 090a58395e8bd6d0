"""``top_neurons``: a recipe's Linear-AcT maps keep only the largest moves, on the LLM and the
diffusers fitting paths alike."""

import pytest
import torch

from actmerge import pipeline
from actmerge.errors import RecipeError
from actmerge.recipe import load_recipe
from actmerge.recipe_sections import sections_of as sections

from .common import PICO_RECIPE, make_pico, write_pico_fit_data

RECIPE = PICO_RECIPE.replace("{name}", "pico-top")
QUIET = dict(progress=False, log=lambda _: None)


@pytest.fixture(scope="module")
def pico(tmp_path_factory):
    root = tmp_path_factory.mktemp("top")
    path = make_pico("llama", root / "model")
    write_pico_fit_data(root)
    return root, path


def _moved(m):
    return (m.omega != 1) | (m.beta != 0)


def test_top_neurons_keeps_the_largest_scale_moves(pico):
    """Scale-only maps rank by |log ω|: every kept neuron's |log ω| is ≥ every dropped one's, the kept
    values are the dense fit's, and a quarter of each site moves."""
    root, path = pico
    (root / "dense.yaml").write_text(RECIPE.format(method="linear_act") + "fit_shift: false\n")
    (root / "top.yaml").write_text(
        RECIPE.format(method="linear_act") + "fit_shift: false\ntop_neurons: 0.25\n"
    )
    dense = pipeline.fit(str(path), root / "dense.yaml", **QUIET).maps
    top = pipeline.fit(str(path), root / "top.yaml", **QUIET).maps
    for k, d in dense.maps.items():
        moved = _moved(top.maps[k])
        assert int(moved.sum()) == round(0.25 * d.dim), k
        assert torch.equal(top.maps[k].omega[moved], d.omega[moved])
        score = d.omega.log().abs()
        assert score[moved].min() >= score[~moved].max(), k


def test_top_neurons_incremental_and_shifts(pico):
    root, path = pico
    (root / "inc.yaml").write_text(
        RECIPE.format(method="linear_act") + "top_neurons: 0.5\nincremental: true\n"
    )
    inc = pipeline.fit(str(path), root / "inc.yaml", **QUIET).maps
    for k, m in inc.maps.items():
        assert int(_moved(m).sum()) == round(0.5 * m.dim), k
    (root / "mean.yaml").write_text(RECIPE.format(method="mean_act") + "top_neurons: 0.5\n")
    for k, m in pipeline.fit(str(path), root / "mean.yaml", **QUIET).maps.items():
        assert int((m.beta != 0).sum()) <= round(0.5 * m.dim) and (m.omega == 1).all(), k


def test_top_neurons_validated(pico):
    root, _ = pico
    for extra, match in (("top_neurons: 0.5\n", "lineas.l1"), ("top_neurons: 0\n", "top_neurons")):
        method = "lineas" if "0.5" in extra else "linear_act"
        (root / "bad.yaml").write_text(RECIPE.format(method=method) + extra)
        with pytest.raises(RecipeError, match=match):
            load_recipe(root / "bad.yaml")
    (root / "ok.yaml").write_text(RECIPE.format(method="linear_act"))
    (root / "ok1.yaml").write_text(RECIPE.format(method="linear_act") + "top_neurons: 1.0\n")
    assert load_recipe(root / "ok.yaml").content_hash() == load_recipe(root / "ok1.yaml").content_hash()


def test_top_neurons_per_family(pico, tmp_path):
    """One recipe, per-family fractions: the llama row here, ``default`` elsewhere; an unknown family
    key is refused with the site-table rows."""
    root, path = pico
    text = RECIPE.format(method="linear_act") + "top_neurons:\n  llama: 0.5\n  default: 1.0\n"
    (root / "fam.yaml").write_text(text)
    r = load_recipe(root / "fam.yaml")
    from actmerge.sites import architecture_for

    assert sections(r, architecture_for("llama")).fit.top_neurons == 0.5
    assert (
        sections(r, architecture_for("gpt2")).fit.top_neurons == 1.0
        and sections(r, None).fit.top_neurons == 1.0
    )
    for k, m in pipeline.fit(str(path), root / "fam.yaml", **QUIET).maps.maps.items():
        assert int(((m.omega != 1) | (m.beta != 0)).sum()) == round(0.5 * m.dim), k
    (root / "bad.yaml").write_text(RECIPE.format(method="linear_act") + "top_neurons:\n  lama: 0.5\n")
    with pytest.raises(RecipeError, match="unknown architecture"):
        load_recipe(root / "bad.yaml")
