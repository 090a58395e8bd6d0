"""The maps file format (a contract with other tools) and the map algebra."""

import pytest
import torch
from safetensors import safe_open

from actmerge.errors import MapsMismatchError
from actmerge.maps import FORMAT, AffineMap, MapSet, compose


def _mapset():
    return MapSet(
        {
            "model.layers.0.self_attn.o_proj:input": AffineMap(
                torch.tensor([2.0, 0.5]), torch.tensor([1.0, -1.0])
            ),
            "model.layers.0.input_layernorm:output": AffineMap(torch.ones(3), torch.zeros(3)),
        },
        base_model="m",
        method="linear_act",
        recipe_hash="abc",
    )


def test_file_layout_and_roundtrip(tmp_path):
    path = _mapset().save(tmp_path / "maps.safetensors")
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == {
            "model.layers.0.self_attn.o_proj:input:omega",
            "model.layers.0.self_attn.o_proj:input:beta",
            "model.layers.0.input_layernorm:output:omega",
            "model.layers.0.input_layernorm:output:beta",
        }
        assert f.get_tensor("model.layers.0.self_attn.o_proj:input:omega").dtype == torch.float32
        meta = f.metadata()
    assert meta["format"] == FORMAT and meta["base_model"] == "m" and meta["method"] == "linear_act"
    assert meta["recipe_hash"] == "abc"
    back = MapSet.load(path)
    assert list(back.maps) == list(_mapset().maps)
    assert torch.equal(back.maps["model.layers.0.self_attn.o_proj:input"].beta, torch.tensor([1.0, -1.0]))


def test_strength_semantics():
    m = AffineMap(torch.tensor([3.0]), torch.tensor([2.0]))
    s, c = m.at(0.5)
    assert s.item() == pytest.approx(2.0) and c.item() == pytest.approx(1.0)  # (1-λ+λω), λβ
    s, c = m.at(0.0)
    assert s.item() == 1.0 and c.item() == 0.0


def test_compose_is_sequential_application():
    a = MapSet({"k:input": AffineMap(torch.tensor([2.0]), torch.tensor([1.0]))})
    b = MapSet(
        {
            "k:input": AffineMap(torch.tensor([3.0]), torch.tensor([-1.0])),
            "j:output": AffineMap(torch.tensor([0.5]), torch.tensor([0.0])),
        }
    )
    c = compose(a, b, (1.0, 0.5))
    x = torch.tensor([0.7])
    s1, c1 = a.maps["k:input"].at(1.0)
    s2, c2 = b.maps["k:input"].at(0.5)
    sc, cc = c.maps["k:input"].at(1.0)
    assert torch.allclose(sc * x + cc, s2 * (s1 * x + c1) + c2)
    assert "j:output" in c.maps


def test_bad_files(tmp_path):
    with pytest.raises(MapsMismatchError, match="does not exist"):
        MapSet.load(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(MapsMismatchError, match="not a readable"):
        MapSet.load(tmp_path / "junk.safetensors")
    with pytest.raises(MapsMismatchError):
        AffineMap(torch.ones(3), torch.zeros(2))
