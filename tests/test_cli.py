"""The CLI end to end on a pico model: fit → bake (dry-run, real) → verify in a fresh process → sites."""

import json

import pytest
from typer.testing import CliRunner

from actmerge.cli import app

from .common import make_pico

runner = CliRunner()

RECIPE = """
name: pico-test
method: linear_act
sites:
  - site: [attn_ctx, mlp_hidden]
    layers: all
source: src.txt
target: tgt.txt
max_sentences: 40
batch_size: 8
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = make_pico("gpt2", root / "gpt2")
    (root / "src.txt").write_text("\n".join(f"bad words number {i} are here!!" for i in range(30)))
    (root / "tgt.txt").write_text("\n".join(f"kind text {i}, nice and calm." for i in range(30)))
    (root / "r.yaml").write_text(RECIPE)
    return root, model


def test_fit_bake_verify(setup, tmp_path, monkeypatch):
    root, model = setup
    maps = tmp_path / "maps.safetensors"
    r = runner.invoke(app, ["fit", str(model), "--recipe", str(root / "r.yaml"), "-o", str(maps)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["bake", str(model), "--maps", str(maps), "--strength", "1.0", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "fold plan" in r.output and "exact" in r.output
    assert not (tmp_path / "out").exists()
    r = runner.invoke(
        app, ["bake", str(model), "--maps", str(maps), "--strength", "0.5,1.0", "-o", str(tmp_path / "out")]
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "lambda-0.5" / "config.json").is_file()
    monkeypatch.chdir(tmp_path)  # a relative checkpoint path must not be taken for a Hub id
    r = runner.invoke(app, ["verify", "out/lambda-1", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output[r.output.index("{") :])
    assert rep["passed"] and rep["max_abs_logit_diff"] <= 1e-4 and rep["argmax_agreement"] == 1.0
    # a wrong strength must fail verification (the check can fail)
    r = runner.invoke(app, ["verify", str(tmp_path / "out" / "lambda-1"), "--strength", "0.5"])
    assert r.exit_code == 5, r.output
    # existing output refused without --force
    r = runner.invoke(app, ["bake", str(model), "--maps", str(maps), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "already exists" in r.output


def test_bake_from_recipe_and_errors(setup, tmp_path):
    root, model = setup
    r = runner.invoke(
        app, ["bake", str(model), "--recipe", str(root / "r.yaml"), "-o", str(tmp_path / "o"), "--verify"]
    )
    assert r.exit_code == 0, r.output
    assert "PASS" in r.output
    assert (tmp_path / "o" / "actmerge" / "recipe.yaml").read_text() == (root / "r.yaml").read_text()
    (root / "bad.yaml").write_text(RECIPE + "colour: red\n")
    r = runner.invoke(
        app, ["bake", str(model), "--recipe", str(root / "bad.yaml"), "-o", str(tmp_path / "p")]
    )
    assert r.exit_code == 2 and "colour" in r.output
    r = runner.invoke(app, ["bake", str(model), "-o", str(tmp_path / "p")])
    assert r.exit_code == 2 and "exactly one" in r.output


def test_sites_command(setup):
    _, model = setup
    r = runner.invoke(app, ["sites"], env={"COLUMNS": "250"})
    assert r.exit_code == 0 and "gemma3_text" in r.output and "post_feedforward_layernorm" in r.output
    r = runner.invoke(app, ["sites", str(model)], env={"COLUMNS": "250"})
    assert r.exit_code == 0 and "attn_ctx" in r.output


def test_fit_lineas_recipe_and_compose(setup, tmp_path):
    root, model = setup
    (root / "lineas.yaml").write_text(
        RECIPE.replace("method: linear_act", "method: lineas\nlineas:\n  steps: 2\n  batch: 8")
    )
    a, b, c = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    r = runner.invoke(app, ["fit", str(model), "--recipe", str(root / "lineas.yaml"), "-o", str(a)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["fit", str(model), "--recipe", str(root / "r.yaml"), "-o", str(b)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["compose", str(a), str(b), "--strength", "1.0,0.5", "-o", str(c)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["bake", str(model), "--maps", str(c), "-o", str(tmp_path / "o"), "--verify"])
    assert r.exit_code == 0 and "PASS" in r.output, r.output
    r = runner.invoke(
        app,
        [
            "bake",
            str(model),
            "--recipe",
            str(root / "r.yaml"),
            "--recipe",
            str(root / "lineas.yaml"),
            "--strength",
            "1.0,0.5",
            "-o",
            str(tmp_path / "o2"),
        ],
    )
    assert r.exit_code == 0, r.output
    # each recipe ships with its sentence files, reproducible from the checkpoint alone
    from actmerge.recipe import load_recipe

    shipped = load_recipe(tmp_path / "o2" / "actmerge" / "recipe-2" / "recipe.yaml")
    assert shipped.read_source() == load_recipe(root / "lineas.yaml").read_source()
    assert "--recipe model/actmerge/recipe-2/recipe.yaml" in (tmp_path / "o2" / "README.md").read_text()


def test_eval_refuses_a_missing_baked_dir_before_loading(setup, tmp_path):
    """A mistyped --baked path is a clear error naming it (no Hub-id traceback), before any slow work."""
    root, model = setup
    r = runner.invoke(
        app,
        ["eval", str(model), "--recipe", str(root / "r.yaml"), "--strengths", "",
         "--baked", str(tmp_path / "nope"), "-o", str(tmp_path / "rep")],
    )  # fmt: skip
    assert r.exit_code == 2, r.output  # ModelResolutionError
    assert "does not exist" in r.output and "nope" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "rep").exists()
    (tmp_path / "plain").mkdir()
    r = runner.invoke(
        app, ["eval", str(model), "--strengths", "", "--baked", str(tmp_path / "plain"), "-o", "x"]
    )
    assert r.exit_code == 2 and "no config.json" in r.output, r.output
