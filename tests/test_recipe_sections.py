"""The recipe in sections: the flat YAML schema users write, read by the code as five frozen sections
(fit, fold, eval, tune, chat) resolved once per architecture row; chat fit modes as a registry; the
recipe hash of the built-in recipes unchanged (bake.json provenance)."""

from dataclasses import FrozenInstanceError
from types import SimpleNamespace
from typing import get_args

import pytest

from actmerge import chat
from actmerge.errors import RecipeError
from actmerge.kinds.diffusers.recipe import load_diffusion_recipe
from actmerge.recipe import LineasOptions, Recipe, load_recipe
from actmerge.recipe_sections import sections_of as resolve
from actmerge.recipes_catalog import BUILTIN_DIR
from actmerge.sites import architecture_for
from actmerge.strength import default_for

from .common import PICO_RECIPE, char_tokenizer, write_pico_fit_data

# content_hash of the built-in recipes as bake.json and tune records know them (before the sections)
HASHES = {
    "detox": "87db98be542f5cae",
    "detox-act": "527bd7036aed0cae",
    "detox-lineas": "e622aee908d33752",
    "football": "2c74a3cc2fa154b4",
    "diffusion-no-elephant": "bf52330be378f17b",
    "diffusion-watercolor": "14e39806b2da7fc5",
}


@pytest.mark.parametrize("name", sorted(HASHES))
def test_builtin_recipes_keep_their_hash(name):
    path = BUILTIN_DIR / f"{name}.yaml"
    recipe = load_diffusion_recipe(path) if name.startswith("diffusion") else load_recipe(path)
    assert recipe.content_hash() == HASHES[name]


def test_sections_resolve_per_family_once():
    """football: its Llama row and the default row differ in sites and strength; every section is a
    plain frozen value (paths resolved against the recipe's directory)."""
    r = load_recipe(BUILTIN_DIR / "football.yaml")
    llama, gemma = resolve(r, architecture_for("llama")), resolve(r, architecture_for("gemma3_text"))
    assert (llama.family, gemma.family) == ("llama", architecture_for("gemma3_text").name)
    assert llama.fit.sites != gemma.fit.sites and llama.fold.strength != gemma.fold.strength
    assert llama.fold.strength == default_for(r, SimpleNamespace(config={"model_type": "llama"}))
    assert llama.fit.lineas is None and llama.fit.method == r.method  # lineas only for method: lineas
    assert llama.eval.prompts == r.path(r.eval_prompts) and llama.eval.prompts.is_absolute()
    assert llama.tune.neutral == r.path(r.tune_neutral) and llama.chat.on == r.chat
    with pytest.raises(FrozenInstanceError):
        llama.fit.seed = 1  # type: ignore[misc]
    lineas = load_recipe(BUILTIN_DIR / "detox-lineas.yaml")
    fit = resolve(lineas, architecture_for("llama")).fit
    assert isinstance(fit.lineas, LineasOptions) and fit.lineas.steps == 8 and fit.top_neurons == 1.0


def test_a_family_missing_from_strength_is_an_error_only_when_the_strength_is_needed(tmp_path):
    write_pico_fit_data(tmp_path)
    text = PICO_RECIPE.format(name="s", method="linear_act") + "strength:\n  gemma3: 0.5\n"
    (tmp_path / "r.yaml").write_text(text)
    r = load_recipe(tmp_path / "r.yaml")
    sec = resolve(r, architecture_for("llama"))  # the fit, eval and tune read on
    assert sec.fold.strength is None and sec.fit.sites == resolve(r, architecture_for("gemma3")).fit.sites
    with pytest.raises(RecipeError, match="has no entry for llama.*add `llama:` or `default:`"):
        sec.need("strength")
    with pytest.raises(RecipeError, match="has no entry for llama.*add `llama:` or `default:`"):
        default_for(r, SimpleNamespace(config={"model_type": "llama"}))


def test_the_recipe_is_not_asked_per_architecture():
    """Per-family values are read from the resolved sections, never asked of the recipe late."""
    assert [n for n in dir(Recipe) if n.endswith("_for")] == []


def test_chat_fit_modes_are_a_registry_matching_the_schema(tmp_path):
    assert set(chat.FIT_MODES) == set(get_args(Recipe.model_fields["chat_fit"].annotation))
    tok = char_tokenizer()
    write_pico_fit_data(tmp_path)
    base = PICO_RECIPE.format(name="c", method="mean_act")
    (tmp_path / "requests.txt").write_text("hi\n")
    extra = {
        "assistant": "chat: true\n",
        "raw": "chat: true\nchat_fit: raw\n",
        "instruction": "chat: true\nchat_fit: instruction\ninstruction: Say ball.\nchat_requests: requests.txt\n",
    }
    src, tgt = ["a b", "c"], ["d"]
    for mode, fields in extra.items():
        (tmp_path / f"{mode}.yaml").write_text(base + fields)
        section = resolve(load_recipe(tmp_path / f"{mode}.yaml")).chat
        assert section.fit == mode
        assert chat.fit_texts(tok, src, tgt, section) == (src, tgt)  # no template: raw text
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    got = {
        mode: chat.fit_texts(tok, src, tgt, resolve(load_recipe(tmp_path / f"{mode}.yaml")).chat)
        for mode in extra
    }
    assert got["raw"] == (src, tgt)
    assert got["assistant"] == (chat.assistant_turns(tok, src), chat.assistant_turns(tok, tgt))
    assert got["instruction"] == chat.instruction_pairs(tok, ["hi"], src + tgt, "Say ball.")
    off = resolve(load_recipe(tmp_path / "raw.yaml").model_copy(update={"chat": False})).chat
    assert chat.fit_texts(tok, src, tgt, off) == (src, tgt)  # chat: false
