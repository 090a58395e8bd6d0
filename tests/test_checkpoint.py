"""The streaming writer: multi-shard index, byte-identical untouched tensors, atomic output."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from actmerge import pipeline
from actmerge.errors import OutputExistsError
from actmerge.io import st_format, st_reader, st_rewrite, weights
from actmerge.io.tree import INDEX
from actmerge.kinds.llm.hooks import steer
from actmerge.models import ModelSource

from .common import char_tokenizer, load, pico_config, random_ids, random_maps

QUIET = dict(progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded") / "llama"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(pico_config("llama")).save_pretrained(path, max_shard_size="20KB")
    char_tokenizer().save_pretrained(path)
    (path / "generation_config.json").write_text('{"do_sample": false}\n')
    return path


def test_multi_shard_index_and_bytes(sharded, tmp_path):
    src = ModelSource("pico", sharded)
    files = src.safetensors_files()
    assert len(files) >= 3
    maps = random_maps(
        src.config, ["attn_in", "mlp_hidden"], seed=1
    )  # shifts → new q,k,v,o + gate,up,down biases
    (res,) = pipeline.bake(
        pipeline.Loaded(src),
        maps=maps,
        options=pipeline.BakeOptions(strengths=[1.0], out=tmp_path / "o"),
        **QUIET,
    )
    out = res.out
    index = json.loads((out / INDEX).read_text())
    # every tensor in the index is in the named shard, and every shard tensor is in the index
    seen = {}
    for f in files:
        with safe_open(str(out / f.name), "pt") as h:
            for k in h.keys():
                seen[k] = f.name
    assert seen == index["weight_map"]
    assert "model.layers.1.self_attn.o_proj.bias" in seen and "model.layers.0.mlp.up_proj.bias" in seen
    assert index["metadata"]["total_size"] == sum(
        (m["data_offsets"][1] - m["data_offsets"][0])
        for f in files
        for m in st_format.read_shard(out / f.name).tensors().values()
    )
    # untouched tensors are byte-identical
    edited = set(res.plan.edited_tensors())
    for f in files:
        a, b = st_format.read_shard(f), st_format.read_shard(out / f.name)
        raw_a, raw_b = f.read_bytes(), (out / f.name).read_bytes()
        for name, meta in a.tensors().items():
            if name in edited:
                continue
            s, e = meta["data_offsets"]
            s2, e2 = b.tensors()[name]["data_offsets"]
            assert (
                raw_a[a.data_start + s : a.data_start + e] == raw_b[b.data_start + s2 : b.data_start + e2]
            ), name
    # side files verbatim, config patched with the planned flags only
    assert (out / "generation_config.json").read_bytes() == (sharded / "generation_config.json").read_bytes()
    assert (out / "tokenizer.json").read_bytes() == (sharded / "tokenizer.json").read_bytes()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["attention_bias"] is True and cfg["mlp_bias"] is True
    # and the model is right
    base, ids = load(sharded), random_ids()
    with steer(base, maps, 1.0), torch.no_grad():
        ref = base(input_ids=ids).logits
    with torch.no_grad():
        assert (ref - load(out)(input_ids=ids).logits).abs().max() <= 1e-4
    # provenance
    assert (out / "actmerge" / "maps.safetensors").is_file() and (out / "README.md").is_file()
    bake = json.loads((out / "actmerge" / "bake.json").read_text())
    assert bake["strength"] == 1.0 and bake["config_patch"] == {"attention_bias": True, "mlp_bias": True}
    assert bake["kind"] == "llm" and {r["exactness"] for r in bake["fold"]} == {"exact+flags"}


def test_refuses_existing_output_and_source_overlap(sharded, tmp_path):
    src = ModelSource("pico", sharded)
    maps = random_maps(src.config, ["attn_ctx"], seed=2)
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError, match="--force"):
        pipeline.bake(
            pipeline.Loaded(src), maps=maps, options=pipeline.BakeOptions(out=tmp_path / "exists"), **QUIET
        )
    with pytest.raises(OutputExistsError, match="overlaps"):
        pipeline.bake(
            pipeline.Loaded(src), maps=maps, options=pipeline.BakeOptions(out=sharded / "inside"), **QUIET
        )
    with pytest.raises(OutputExistsError, match="not an actmerge output"):  # --force never deletes user files
        pipeline.bake(
            pipeline.Loaded(src),
            maps=maps,
            options=pipeline.BakeOptions(out=tmp_path / "exists", force=True),
            **QUIET,
        )
    (res,) = pipeline.bake(
        pipeline.Loaded(src), maps=maps, options=pipeline.BakeOptions(out=tmp_path / "baked"), **QUIET
    )
    (res,) = pipeline.bake(
        pipeline.Loaded(src),
        maps=maps,
        options=pipeline.BakeOptions(out=tmp_path / "baked", force=True),
        **QUIET,
    )
    assert (res.out / "config.json").is_file()


def test_interrupt_mid_write_leaves_nothing(sharded, tmp_path, monkeypatch):
    src = ModelSource("pico", sharded)
    maps = random_maps(src.config, ["attn_ctx"], seed=2)
    calls = {"n": 0}
    real = weights.write_shard

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(weights, "write_shard", flaky)
    with pytest.raises(KeyboardInterrupt):
        pipeline.bake(
            pipeline.Loaded(src), maps=maps, options=pipeline.BakeOptions(out=tmp_path / "o"), **QUIET
        )
    assert list(tmp_path.iterdir()) == []  # no output, no temp dir


def test_streaming_keeps_one_input_shard_open(sharded, tmp_path, monkeypatch):
    """At most one input shard is open (and only edited tensors are materialised) at any time."""
    src = ModelSource("pico", sharded)
    maps = random_maps(src.config, ["attn_in", "attn_ctx", "mlp_hidden", "mlp_out"], seed=5)
    state = {"open": 0, "max": 0, "tensors": 0}
    real = st_reader.safe_open

    class Counting:
        def __init__(self, *a, **k):
            self.inner = real(*a, **k)

        def __enter__(self):
            state["open"] += 1
            state["max"] = max(state["max"], state["open"])
            self.h = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            state["open"] -= 1
            return self.inner.__exit__(*exc)

        def get_tensor(self, name):
            state["tensors"] += 1
            return self.h.get_tensor(name)

    monkeypatch.setattr(st_reader, "safe_open", Counting)
    (res,) = pipeline.bake(
        pipeline.Loaded(src),
        maps=maps,
        options=pipeline.BakeOptions(strengths=[1.0], out=tmp_path / "o"),
        **QUIET,
    )
    assert state["max"] == 1 and state["open"] == 0
    edited_existing = [n for n in res.plan.edited_tensors() if n not in res.plan.new_tensors]
    assert state["tensors"] == len(edited_existing)  # untouched tensors are never loaded


@pytest.mark.parametrize("append", [False, True])
def test_write_shard_patches_only_edited_ranges(tmp_path, append):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    tensors = {f"t{i}": torch.randn(3 + i, 5) for i in range(5)}
    save_file(tensors, str(tmp_path / "s.safetensors"), metadata={"format": "pt"})
    shard = st_format.read_shard(tmp_path / "s.safetensors")
    values = {"t1": torch.full((4, 5), 7.0), "t3": torch.zeros(6, 5)}  # two edits, not adjacent
    if append:
        values["new.bias"] = torch.arange(4.0)
    st_rewrite.write_shard(shard, values, tmp_path / "o.safetensors")
    got = load_file(str(tmp_path / "o.safetensors"))
    assert set(got) == set(tensors) | set(values)
    for name, t in {**tensors, **values}.items():
        assert torch.equal(got[name], t), name
    src, out = (tmp_path / "s.safetensors").read_bytes(), (tmp_path / "o.safetensors").read_bytes()
    if not append:  # same header bytes, same length; only the edited byte ranges differ
        assert len(src) == len(out) and out[: shard.data_start] == src[: shard.data_start]
        keep = [m["data_offsets"] for n, m in shard.tensors().items() if n not in values]
        for s, e in keep:
            assert (
                out[shard.data_start + s : shard.data_start + e]
                == src[shard.data_start + s : shard.data_start + e]
            )
