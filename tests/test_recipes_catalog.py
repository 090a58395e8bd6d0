"""Built-in recipes: the lookup order of `--recipe` (a local file wins, then a built-in by name,
else an error listing the built-ins), `actmerge recipes` list/show/copy, a copied recipe that
loads and bakes, and the wheel that carries the recipes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from actmerge.cli import app
from actmerge.errors import RecipeError
from actmerge.recipe import load_recipe
from actmerge.recipes_catalog import BUILTIN_DIR, builtin_names, catalog, find_recipe

from .common import make_pico

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
SHIPPED = {
    "detox",
    "detox-act",
    "detox-gguf",
    "detox-lineas",
    "football",
    "diffusion-watercolor",
    "diffusion-no-elephant",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Pico models run fastest on one thread (on a loaded machine several threads contend)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_builtins_live_in_the_package():
    assert BUILTIN_DIR == ROOT / "actmerge" / "recipes"
    assert set(builtin_names()) == SHIPPED
    # the repository's recipes/ path (README commands, benches) is the same directory
    assert (ROOT / "recipes").resolve() == BUILTIN_DIR
    for name in SHIPPED:  # every shipped recipe validates, with its sentence files beside it
        path = find_recipe(name)
        assert path == BUILTIN_DIR / f"{name}.yaml"
        if name.startswith("diffusion"):
            from actmerge.kinds.diffusers.recipe import load_diffusion_recipe

            assert load_diffusion_recipe(name).read_source()
        else:
            assert load_recipe(name).read_source()


def test_lookup_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    logged = []
    # nothing local: the built-in, by name or file name, logged
    assert find_recipe("detox.yaml", log=logged.append) == BUILTIN_DIR / "detox.yaml"
    assert find_recipe("detox", log=logged.append) == BUILTIN_DIR / "detox.yaml"
    assert logged[0] == f"[actmerge] recipe detox.yaml: the built-in detox ({BUILTIN_DIR / 'detox.yaml'})"
    assert load_recipe("detox").name == "detox"
    # a local file of the same name wins (and the log says so)
    local = tmp_path / "detox.yaml"
    local.write_text((BUILTIN_DIR / "detox.yaml").read_text().replace("name: detox", "name: my-detox"))
    (tmp_path / "data").symlink_to(BUILTIN_DIR / "data")
    logged.clear()
    assert find_recipe("detox.yaml", log=logged.append) == Path("detox.yaml")
    assert find_recipe("detox", log=logged.append) == Path("detox.yaml")
    assert logged == ["[actmerge] recipe detox.yaml: the local file detox.yaml (not the built-in detox)"] + [
        "[actmerge] recipe detox: the local file detox.yaml (not the built-in detox)"
    ]
    assert load_recipe("detox.yaml").name == "my-detox"
    # an explicit path is a path: never replaced by a built-in
    with pytest.raises(RecipeError, match="does not exist"):
        find_recipe("elsewhere/detox.yaml")
    # unknown name: the error lists the built-ins
    with pytest.raises(RecipeError) as exc:
        find_recipe("detocks")
    assert all(n in str(exc.value) for n in SHIPPED)
    r = runner.invoke(app, ["fit", "gemma-3-270m", "--recipe", "detocks", "-o", "m.safetensors"])
    assert r.exit_code == 2 and "football" in r.output and "detox-lineas" in r.output


def test_recipes_list_show(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    r = runner.invoke(app, ["recipes"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    for e in catalog():
        assert e.name in r.output and e.method in r.output
    assert all(x in r.output for x in ("attn_post", "50%-100%", "mlp_post", "33.3%-66.7%"))  # detox-act
    assert "default" in r.output  # portable recipes: a default row for the other families
    detox = next(e for e in catalog() if e.name == "detox")
    assert detox.families == ["gemma", "gemma3", "every other family"] and detox.strength == 1.0
    lineas = next(e for e in catalog() if e.name == "detox-lineas")
    assert lineas.strength == "0.8–1"  # per family
    r = runner.invoke(app, ["recipes", "show", "detox"])
    assert r.exit_code == 0, r.output
    assert (BUILTIN_DIR / "detox.yaml").read_text().strip() in r.output
    r = runner.invoke(app, ["recipes", "show", "nope"])
    assert r.exit_code == 2 and "detox" in r.output


@pytest.fixture(scope="module")
def pico_gemma2(tmp_path_factory):
    return make_pico("gemma2", tmp_path_factory.mktemp("pico") / "gemma2", layers=18)


def test_copy_loads_and_bakes(pico_gemma2, tmp_path, monkeypatch):
    r = runner.invoke(app, ["recipes", "copy", "detox-act", str(tmp_path / "mine")])
    assert r.exit_code == 0, r.output
    copied = tmp_path / "mine" / "detox-act.yaml"
    assert copied.read_text() == (BUILTIN_DIR / "detox-act.yaml").read_text()
    for rel in ("data/detox/toxic.txt", "data/detox/nontoxic.txt", "data/detox/eval_prompts.txt"):
        assert (tmp_path / "mine" / rel).read_bytes() == (BUILTIN_DIR / rel).read_bytes()
    r = runner.invoke(app, ["recipes", "copy", "detox-act", str(tmp_path / "mine")])
    assert r.exit_code == 2 and "--force" in r.output
    # edit the copy (fewer sentences, another layer range); relative paths work from any cwd
    copied.write_text(
        copied.read_text()
        .replace("max_sentences: 256", "max_sentences: 48")
        .replace('"33.3%-66.7%"', '"3-4"')
    )
    (tmp_path / "mine" / "data" / "detox" / "toxic.txt").write_text("you utter idiot, shut up\n" * 48)
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(
        app, ["bake", str(pico_gemma2), "--recipe", "mine/detox-act.yaml", "-o", "out", "--strength", "1"]
    )
    assert r.exit_code == 0, r.output
    assert "built-in" not in r.output
    assert (tmp_path / "out" / "actmerge" / "recipe.yaml").read_text() == copied.read_text()
    fold = json.loads((tmp_path / "out" / "actmerge" / "bake.json").read_text())["fold"]
    expect = {f"attn_post[{i}]" for i in range(9, 18)} | {"mlp_post[3]", "mlp_post[4]"}
    assert {row["label"] for row in fold} == expect  # the edited layer range, not the shipped 6-11


def test_wheel_contains_the_recipes(tmp_path):
    """Build the wheel from a copy of the sources (no network, no build isolation) and list it."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "actmerge", src / "actmerge", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
        + ["-w", str(tmp_path / "dist"), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("actmerge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(ROOT).as_posix() for p in BUILTIN_DIR.rglob("*") if p.is_file()}
    assert len(shipped) >= 19 and shipped <= names, sorted(shipped - names)
    assert {"actmerge/recipes_catalog.py", "actmerge/names.py", "actmerge/data/neutral.txt"} <= names
