"""``chat_source`` / ``chat_target``: a chat recipe names other fitting sentences for models with a
chat template (e.g. replies shaped like a chat model's), and keeps ``source`` / ``target`` for base
models. Pico models and a char tokenizer (fast)."""

import pytest
import torch

from actmerge import pipeline
from actmerge.errors import RecipeError
from actmerge.recipe import load_recipe

from .common import PICO_RECIPE, PICO_SENTENCES, char_tokenizer, make_pico, write_pico_fit_data

QUIET = dict(progress=False, log=lambda _: None)
TEMPLATE = (
    "{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<bos>assistant: {% endif %}"
)
RECIPE = PICO_RECIPE.replace("{name}", "pico-chat").format(method="mean_act") + "chat: true\n"
CHAT = "chat_source: chat_src.txt\nchat_target: chat_tgt.txt\n"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    write_pico_fit_data(root)
    # the chat sentences: the plain ones reversed (so a fit on them differs), as many
    (root / "chat_src.txt").write_text("\n".join(s[::-1] for s in PICO_SENTENCES[:12]))
    (root / "chat_tgt.txt").write_text("\n".join(s[::-1] for s in PICO_SENTENCES[12:]))
    (root / "plain.yaml").write_text(RECIPE)
    (root / "chat.yaml").write_text(RECIPE + CHAT)
    base = make_pico("llama", root / "base")
    templated = make_pico("llama", root / "instruct")  # the same weights (same seed), with a template
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    tok.save_pretrained(templated)
    return root, base, templated


def _fit(model, recipe):
    return pipeline.fit(str(model), recipe, **QUIET).maps.maps


def test_a_chat_model_fits_on_the_chat_sentences(root):
    root, base, templated = root
    recipe = load_recipe(root / "chat.yaml")
    assert recipe.fit_sentences(chat_model=True)[0][0] == PICO_SENTENCES[0][::-1]
    assert recipe.fit_sentences(chat_model=False)[0][0] == PICO_SENTENCES[0]
    # a base model (no template) fits exactly as the recipe without chat sentences
    plain, chat_on_base = _fit(base, root / "plain.yaml"), _fit(base, root / "chat.yaml")
    assert all(torch.equal(plain[k].beta, chat_on_base[k].beta) for k in plain)
    # the instruct model: other sentences, so other maps than the same recipe without them
    chat, plain_on_chat = _fit(templated, root / "chat.yaml"), _fit(templated, root / "plain.yaml")
    assert all(not torch.equal(chat[k].beta, plain_on_chat[k].beta) for k in chat)


def test_chat_sentences_validated_and_hashed(root):
    root, _, _ = root
    (root / "half.yaml").write_text(RECIPE + "chat_source: chat_src.txt\n")
    with pytest.raises(RecipeError, match="chat_source and chat_target go together"):
        load_recipe(root / "half.yaml")
    (root / "missing.yaml").write_text(RECIPE + "chat_source: nope.txt\nchat_target: chat_tgt.txt\n")
    with pytest.raises(RecipeError, match="nope.txt does not exist"):
        load_recipe(root / "missing.yaml")
    plain, chat = load_recipe(root / "plain.yaml"), load_recipe(root / "chat.yaml")
    assert plain.content_hash() != chat.content_hash()  # the chat sentences are part of the fit
    before = chat.content_hash()
    (root / "chat_tgt.txt").write_text((root / "chat_tgt.txt").read_text() + "\nanother one here")
    assert load_recipe(root / "chat.yaml").content_hash() != before
