"""What a recipe file may name, and what of it ships: data files live beside the recipe (refused
before any model load otherwise), only the files a bake reads are copied into the checkpoint, and
every malformed recipe or data file is a one-line error (exit 2), never a traceback or a hang."""

import hashlib
import os
import signal
from contextlib import contextmanager

import pytest
from typer.testing import CliRunner

from actmerge import pipeline
from actmerge.cli import app
from actmerge.errors import RecipeError
from actmerge.recipe import load_recipe

from .common import make_pico

runner = CliRunner()

RECIPE = """
name: pico-files
sites: [attn_ctx]
source: {source}
target: tgt.txt
max_sentences: 24
batch_size: 8
min_sentences: 12
"""
SENTENCES = "\n".join(f"sentence {i} says{'!' * (i % 5)} something" for i in range(24))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_pico("gpt2", tmp_path_factory.mktemp("files") / "gpt2")


def recipe_dir(tmp_path, source="src.txt", extra=""):
    d = tmp_path / "recipe"
    d.mkdir(exist_ok=True)
    (d / "src.txt").write_text(SENTENCES)
    (d / "tgt.txt").write_text(SENTENCES[::-1])
    (d / "r.yaml").write_text(RECIPE.format(source=source) + extra)
    return d / "r.yaml"


def tree(root) -> dict[str, str]:
    out = {}
    for top, _, names in os.walk(root):
        for n in names:
            p = os.path.join(top, n)
            if os.path.isfile(p) and not os.path.islink(p):
                out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: the refusals come first."""

    def load(*_a, **_k):
        raise AssertionError("a model was loaded before the recipe was checked")

    monkeypatch.setattr(pipeline, "load", load)


def _secret(tmp_path):
    secret = tmp_path / "home" / ".ssh" / "id_rsa"
    secret.parent.mkdir(parents=True)
    secret.write_text("\n".join(f"-----PRIVATE KEY LINE {i}-----" for i in range(24)))
    return secret


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink", "unused keywords"])
def test_a_path_leaving_the_recipe_dir_is_refused_before_any_load(model, tmp_path, no_model_load, how):
    secret = _secret(tmp_path)
    if how == "absolute":
        r = recipe_dir(tmp_path, source=str(secret))
    elif how == "dotdot":
        r = recipe_dir(tmp_path, source="../home/.ssh/id_rsa")
    elif how == "symlink":
        r = recipe_dir(tmp_path, source="data/src.txt")
        (r.parent / "data").mkdir()
        (r.parent / "data" / "src.txt").symlink_to(secret)
    else:  # a field this bake never reads is refused all the same
        r = recipe_dir(tmp_path, extra=f"keywords: {secret}\n")
    with pytest.raises(RecipeError, match="outside the recipe's directory") as e:
        load_recipe(r)
    assert "\n" not in str(e.value) and "Copy the file into that directory" in str(e.value)
    before = tree(tmp_path)
    out = tmp_path / "out"
    res = runner.invoke(app, ["bake", str(model), "--recipe", str(r), "-o", str(out)])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert not out.exists() and tree(tmp_path) == before


def test_symlinks_and_dotdot_that_stay_inside_are_fine(tmp_path):
    r = recipe_dir(tmp_path, source="sub/../src.txt", extra="eval_prompts: prompts.txt\n")
    (r.parent / "sub").mkdir()
    (r.parent / "prompts.txt").symlink_to(r.parent / "src.txt")
    assert load_recipe(r).read_source() == SENTENCES.splitlines()


def test_only_the_files_a_bake_reads_are_shipped(model, tmp_path, monkeypatch):
    extra = (
        "keywords: kw.txt\neval_prompts: eval.txt\ntune_prompts: tune.txt\ntune_neutral: neutral.txt\n"
        "neutral_text: neutral.txt\nmetrics: [toxicity, perplexity]\neval_max_new_tokens: 2\n"
    )
    r = recipe_dir(tmp_path, extra=extra)
    for name in ("kw.txt", "eval.txt", "tune.txt", "neutral.txt"):
        (r.parent / name).write_text(f"{name} line one\n{name} line two\n")
    res = runner.invoke(app, ["bake", str(model), "--recipe", str(r), "-o", str(tmp_path / "plain")])
    assert res.exit_code == 0, res.output
    shipped = sorted(tree(tmp_path / "plain" / "actmerge"))
    assert shipped == ["bake.json", "maps.safetensors", "recipe.yaml", "src.txt", "tgt.txt"]
    # --eval reads the eval prompts and the neutral text: they ship (the card's table was measured on
    # them); the keywords (no concept metric) and the tuning split (no --strength auto) do not
    res = runner.invoke(app, ["bake", str(model), "--recipe", str(r), "-o", str(tmp_path / "ev"), "--eval"])
    assert res.exit_code == 0, res.output
    shipped = sorted(tree(tmp_path / "ev" / "actmerge"))
    assert shipped == [
        "bake.json",
        "eval.txt",
        "maps.safetensors",
        "neutral.txt",
        "recipe.yaml",
        "src.txt",
        "tgt.txt",
    ]
    # the card's Reproduce command works from the checkpoint alone
    assert "--recipe model/actmerge/recipe.yaml" in (tmp_path / "ev" / "README.md").read_text()
    os.symlink(tmp_path / "ev", tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(
        app, ["bake", str(model), "--recipe", "model/actmerge/recipe.yaml", "--strength", "1", "-o", "again"]
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (
        tmp_path / "ev" / "model.safetensors"
    ).read_bytes()


def test_a_recipe_with_an_absolute_path_inside_ships_a_rewritten_copy(model, tmp_path):
    r = recipe_dir(tmp_path, extra="keywords: kw.txt\n")
    r.write_text(r.read_text().replace("source: src.txt", f"source: {r.parent / 'src.txt'}"))
    res = runner.invoke(app, ["bake", str(model), "--recipe", str(r), "-o", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    shipped = tmp_path / "o" / "actmerge"
    assert sorted(tree(shipped)) == [
        "bake.json", "data/source-src.txt", "data/target-tgt.txt", "maps.safetensors", "recipe.yaml"
    ]  # fmt: skip
    again = load_recipe(shipped / "recipe.yaml")  # names only what shipped, inside the checkpoint
    assert again.keywords is None and again.read_source() == SENTENCES.splitlines()


# ---- malformed recipes: one line, exit 2 --------------------------------------------------------


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"- name: a\n- name: b\n", "not a mapping"),
        (b"name: x\nsites: [attn_ctx\n", "not valid YAML"),
        (b"name: caf\xe9\n", "not UTF-8"),
        (b"a: " + b"[" * 600 + b"]" * 600 + b"\n", "nested too deeply"),
        (b"".join(b"  " * i + b"k:\n" for i in range(600)), "nested too deeply"),
    ],
    ids=["list", "broken", "non-utf8", "deep-flow", "deep-block"],
)
def test_malformed_recipes_are_one_line_errors(tmp_path, content, needle, no_model_load, model):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    r = runner.invoke(app, ["recipes", "show", str(path)], env={"COLUMNS": "1000"})
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert needle in r.output and len(r.output.strip().splitlines()) == 1, r.output
    r = runner.invoke(app, ["bake", str(model), "--recipe", str(path), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, r.output


# ---- data files that are not regular files: named for what they are, never read ------------------


@contextmanager
def deadline(seconds: int = 60):
    """Fail (TimeoutError) instead of hanging: a blocked open() of a FIFO is interrupted by SIGALRM."""

    def expire(*_):
        raise TimeoutError("blocked reading a data file")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize(
    "kind, needle",
    [
        ("dev-zero", "is a character device, not a regular file"),
        ("fifo", "is a FIFO"),
        ("dir", "is a directory"),
    ],
)
def test_a_source_that_is_not_a_regular_file(tmp_path, kind, needle, no_model_load, model):
    r = recipe_dir(tmp_path, source="data.txt")
    data = r.parent / "data.txt"
    if kind == "dev-zero":
        data.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(data)
    else:
        data.mkdir()
    with deadline(), pytest.raises(RecipeError) as e:
        load_recipe(r)
    assert needle in str(e.value) and "does not exist" not in str(e.value)
    with deadline():
        res = runner.invoke(app, ["bake", str(model), "--recipe", str(r), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output, res.output
    if kind == "dev-zero":  # named directly, outside the directory: still a device first
        r.write_text(r.read_text().replace("source: data.txt", "source: /dev/zero"))
        with deadline(), pytest.raises(RecipeError, match=needle):
            load_recipe(r)


@pytest.mark.parametrize("kind", ["fifo", "dir"])
def test_recipes_show_on_a_fifo_or_directory(tmp_path, kind):
    path = tmp_path / "r.yaml"
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    with deadline():
        r = runner.invoke(app, ["recipes", "show", str(path)], env={"COLUMNS": "1000"})
    assert r.exit_code == 2 and "not a regular file" in r.output and "Traceback" not in r.output, r.output


def test_a_missing_used_file_is_reported_as_missing(tmp_path):
    r = recipe_dir(tmp_path, source="nope.txt")
    with pytest.raises(RecipeError, match="nope.txt does not exist"):
        load_recipe(r)
