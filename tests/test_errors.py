"""Bad input gets a clear error: unknown architecture, mismatched maps, NaN activations, tied tensors."""

import json

import pytest
import torch

from actmerge import pipeline
from actmerge.errors import ActivationError, MapsMismatchError, ModelResolutionError, UnknownArchitectureError
from actmerge.kinds.llm.collect import collect
from actmerge.maps import AffineMap, MapSet
from actmerge.models import ModelSource, resolve
from actmerge.sites import architecture_for

from .common import char_tokenizer, load, make_pico, random_maps

QUIET = dict(progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def pico(tmp_path_factory):
    return make_pico("llama", tmp_path_factory.mktemp("e") / "llama")


def test_unknown_architecture():
    with pytest.raises(UnknownArchitectureError, match="ARCHITECTURES"):
        architecture_for({"model_type": "mamba"})


def test_maps_from_another_model(pico, tmp_path):
    src = ModelSource("pico", pico)
    bad = MapSet({"model.layers.7.self_attn.o_proj:input": AffineMap(torch.ones(32) * 2, torch.zeros(32))})
    with pytest.raises(MapsMismatchError, match="do not match"):
        pipeline.bake(
            pipeline.Loaded(src), maps=bad, options=pipeline.BakeOptions(out=tmp_path / "o"), **QUIET
        )
    wrong_dim = MapSet(
        {"model.layers.0.self_attn.o_proj:input": AffineMap(torch.ones(7) * 2, torch.zeros(7))}
    )
    with pytest.raises(MapsMismatchError, match="dim"):
        pipeline.bake(
            pipeline.Loaded(src), maps=wrong_dim, options=pipeline.BakeOptions(out=tmp_path / "o2"), **QUIET
        )
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


def test_nan_activations(pico):
    model, tok = load(pico), char_tokenizer()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.fill_(float("nan"))
    with pytest.raises(ActivationError, match="non-finite"):
        collect(model, tok, ["hello there"], ["model.layers.1.self_attn.o_proj:input"], progress=False)


def test_nonfinite_maps_refused(pico, tmp_path):
    src = ModelSource("pico", pico)
    maps = random_maps(src.config, ["attn_ctx"])
    next(iter(maps.maps.values())).omega[0] = float("inf")
    with pytest.raises(Exception, match="NaN/Inf"):
        pipeline.bake(
            pipeline.Loaded(src), maps=maps, options=pipeline.BakeOptions(out=tmp_path / "o"), **QUIET
        )
    assert not (tmp_path / "o").exists()


def test_model_resolution_errors(tmp_path):
    with pytest.raises(ModelResolutionError, match="does not exist"):
        resolve(str(tmp_path / "x.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelResolutionError, match="config.json"):
        resolve(str(tmp_path / "empty"))
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelResolutionError, match="no safetensors"):
        resolve(str(tmp_path / "empty"))
    with pytest.raises(ModelResolutionError, match="cannot be reached|not found|could not"):
        resolve("no-such-org/no-such-model")


def test_tied_tensor_guard():
    from actmerge.fold import Edit
    from actmerge.kinds.llm.plan import _guard_tied
    from actmerge.sites import architecture_for

    arch = architecture_for("llama")
    edits = {("", "lm_head"): Edit("linear", "lm_head.weight", None)}
    with pytest.raises(Exception, match="tied"):
        _guard_tied(arch, {"tie_word_embeddings": True}, edits)
    _guard_tied(arch, {"tie_word_embeddings": False}, edits)  # untied: editing is fine
