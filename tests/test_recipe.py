"""Recipe validation: unknown keys, wrong types, missing/empty data files, jsonl."""

import pytest

from actmerge.errors import RecipeError
from actmerge.recipe import load_recipe

GOOD = """
name: t
method: linear_act
sites:
  - site: attn_ctx
    layers: "0-1"
  - mlp_post
source: src.txt
target: tgt.jsonl
"""


def _write(tmp_path, text=GOOD, src="a b\n# comment\n\nc d\n", tgt='{"text": "x"}\n{"text": "y"}\n'):
    (tmp_path / "src.txt").write_text(src)
    (tmp_path / "tgt.jsonl").write_text(tgt)
    (tmp_path / "r.yaml").write_text(text)
    return tmp_path / "r.yaml"


def test_valid_recipe_and_relative_paths(tmp_path):
    r = load_recipe(_write(tmp_path))
    assert [s.names for s in r.sites] == [["attn_ctx"], ["mlp_post"]]
    assert r.read_source() == ["a b", "c d"] and r.read_target() == ["x", "y"]
    assert len(r.content_hash()) == 16


def test_unknown_key_rejected(tmp_path):
    with pytest.raises(RecipeError, match="strenght"):
        load_recipe(_write(tmp_path, GOOD + "strenght: 1.0\n"))


def test_wrong_type_rejected(tmp_path):
    with pytest.raises(RecipeError, match="max_tokens"):
        load_recipe(_write(tmp_path, GOOD + "max_tokens: lots\n"))
    with pytest.raises(RecipeError, match="method"):
        load_recipe(_write(tmp_path, GOOD.replace("linear_act", "magic")))


def test_missing_and_empty_files(tmp_path):
    path = _write(tmp_path)
    (tmp_path / "src.txt").unlink()
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(path)
    (tmp_path / "src.txt").write_text("\n# only a comment\n")
    with pytest.raises(RecipeError, match="empty"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_bad_jsonl_and_no_sites(tmp_path):
    with pytest.raises(RecipeError, match="no string field"):
        load_recipe(_write(tmp_path, tgt='{"body": "x"}\n'))
    with pytest.raises(RecipeError, match="at least one site"):
        load_recipe(
            _write(
                tmp_path, GOOD.replace('sites:\n  - site: attn_ctx\n    layers: "0-1"\n  - mlp_post\n', "")
            )
        )
