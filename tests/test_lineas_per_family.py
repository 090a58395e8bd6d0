"""``lineas:`` per family: one recipe holds a LinEAS schedule per row of the site table (as
``strength:`` and ``sites:`` do), the fit uses the model's own; a single block stays as it was."""

import pytest

from actmerge import pipeline
from actmerge.errors import RecipeError
from actmerge.recipe import LineasOptions, load_recipe
from actmerge.recipe_sections import sections_of as sections
from actmerge.sites import architecture_for

from .common import PICO_RECIPE, make_pico, write_pico_fit_data

RECIPE = PICO_RECIPE.replace("{name}", "pico-lineas").format(method="lineas")
QUIET = dict(progress=False, log=lambda _: None)
PER_FAMILY = """lineas:
  default: &lin {steps: 5, lr: 0.01, batch: 4}
  llama: {<<: *lin, steps: 3, lr: 0.05}
"""


def test_per_family_options_resolve_by_row(tmp_path):
    write_pico_fit_data(tmp_path)
    (tmp_path / "fam.yaml").write_text(RECIPE + PER_FAMILY)
    r = load_recipe(tmp_path / "fam.yaml")
    llama, gemma = (
        sections(r, architecture_for("llama")).fit.lineas,
        sections(r, architecture_for("gemma2")).fit.lineas,
    )
    assert (llama.steps, llama.lr, llama.batch) == (3, 0.05, 4)  # the YAML merge key carries batch
    assert (gemma.steps, gemma.lr, gemma.batch) == (5, 0.01, 4)
    # a single block is every family's
    (tmp_path / "one.yaml").write_text(RECIPE + "lineas: {steps: 5, lr: 0.01, batch: 4}\n")
    one = load_recipe(tmp_path / "one.yaml")
    assert isinstance(one.lineas, LineasOptions)
    assert (
        sections(one, architecture_for("llama")).fit.lineas
        == sections(one, architecture_for("gpt2")).fit.lineas
    )


@pytest.mark.parametrize(
    "block,match",
    [
        ("lineas:\n  lama: {steps: 3}\n", "unknown architecture key.*lama"),
        ("lineas:\n  steps: 3\n  llama: {steps: 4}\n", "unknown architecture key.*steps"),
        ("lineas:\n  stepz: 3\n", "stepz: Extra inputs"),
        ("lineas:\n  llama: {stepz: 3}\n", "stepz"),
    ],
)
def test_bad_lineas_blocks_are_refused(tmp_path, block, match):
    write_pico_fit_data(tmp_path)
    (tmp_path / "bad.yaml").write_text(RECIPE + block)
    with pytest.raises(RecipeError, match=match):
        load_recipe(tmp_path / "bad.yaml")


def test_the_fit_uses_the_models_own_schedule(tmp_path):
    """A llama pico model runs the llama entry's steps; without an entry for its family (and no
    default) the fit is refused with the remedy."""
    write_pico_fit_data(tmp_path)
    path = make_pico("llama", tmp_path / "model")
    (tmp_path / "fam.yaml").write_text(RECIPE + PER_FAMILY)
    fitted = pipeline.fit(str(path), tmp_path / "fam.yaml", **QUIET)
    assert len(fitted.report.losses) == 3
    (tmp_path / "gemma-only.yaml").write_text(RECIPE + "lineas:\n  gemma: {steps: 3, batch: 4}\n")
    with pytest.raises(RecipeError, match="no entry for llama.*add `llama:` or `default:` under `lineas:`"):
        pipeline.fit(str(path), tmp_path / "gemma-only.yaml", **QUIET)
