"""One engine for LLMs and pipelines: bugs the copies had, fixed structurally (issue 12)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from actmerge import pipeline
from actmerge.errors import ModelResolutionError, NotFoldableError
from actmerge.fold import FoldOptions
from actmerge.io import st_format
from actmerge.kinds.llm.hooks import steer
from actmerge.models import ModelSource
from actmerge.recipe import Recipe

from .common import load, make_pico, random_ids, random_maps

QUIET = dict(progress=False, log=lambda *_: None)


def _split_biases(src_dir, dest):
    """The checkpoint re-sharded so that every bias sits in a shard of its own, away from its weight."""
    from safetensors.torch import load_file

    state = load_file(str(src_dir / "model.safetensors"))
    dest.mkdir()
    weights = {k: v for k, v in state.items() if not k.endswith(".bias")}
    biases = {k: v for k, v in state.items() if k.endswith(".bias")}
    save_file(weights, str(dest / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(biases, str(dest / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    index = {k: "model-00001-of-00002.safetensors" for k in weights} | {
        k: "model-00002-of-00002.safetensors" for k in biases
    }
    total = sum(t.numel() * t.element_size() for t in state.values())
    (dest / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index})
    )
    for f in src_dir.iterdir():
        if not f.name.startswith("model"):
            (dest / f.name).write_bytes(f.read_bytes())
    return dest


@pytest.mark.parametrize(("model_type", "sites"), [("qwen2", ["attn_in"]), ("gpt2", ["attn_ctx", "mlp_out"])])
def test_weight_and_bias_in_different_shards(tmp_path, model_type, sites):
    """A module's weight and bias in different shards: each output shard holds only its own tensors,
    the index names the shard every tensor is in, and the baked model equals the hooked one."""
    base = _split_biases(make_pico(model_type, tmp_path / "pico"), tmp_path / "split")
    src = ModelSource("pico", base)
    maps = random_maps(src.config, sites, seed=7)
    assert any(m.beta.abs().max() > 0 for m in maps.maps.values())  # shifts reach the separate biases
    (res,) = pipeline.bake(
        pipeline.Loaded(src),
        maps=maps,
        options=pipeline.BakeOptions(strengths=[1.0], out=tmp_path / "o"),
        **QUIET,
    )
    index = json.loads((res.out / "model.safetensors.index.json").read_text())
    seen: dict[str, list[str]] = {}
    total = 0
    for f in sorted(res.out.glob("*.safetensors")):
        for name, meta in st_format.read_shard(f).tensors().items():
            seen.setdefault(name, []).append(f.name)
            total += st_format.nbytes(meta)
    assert all(len(v) == 1 for v in seen.values()), {k: v for k, v in seen.items() if len(v) > 1}
    assert {k: v[0] for k, v in seen.items()} == index["weight_map"]
    assert index["metadata"]["total_size"] == total
    edited_biases = [n for n in res.plan.edited_tensors() if n.endswith(".bias")]
    assert edited_biases and all(seen[n] == ["model-00002-of-00002.safetensors"] for n in edited_biases)
    ids = random_ids()
    hooked = load(base)
    with steer(hooked, maps, 1.0), torch.no_grad():
        ref = hooked(input_ids=ids).logits
    with torch.no_grad():
        assert (ref - load(res.out)(input_ids=ids).logits).abs().max() <= 1e-4


def test_recipe_targets_reach_the_planner(tmp_path):
    """`targets: [llama.cpp]` in a recipe refuses an o_proj bias at plan time (not only in LinEAS)."""
    src = ModelSource("pico", make_pico("gemma3_text", tmp_path / "pico"))
    maps = random_maps(src.config, ["attn_ctx"], seed=3)  # Gemma: the shift needs an o_proj bias
    (tmp_path / "s.txt").write_text("a\nb\n")
    recipe = Recipe(name="t", sites=["attn_ctx"], source="s.txt", target="s.txt", targets=["llama.cpp"])
    with pytest.raises(NotFoldableError, match="llama.cpp"):
        pipeline.plan(src, maps, 1.0, FoldOptions.merged(recipe))
    assert pipeline.plan(src, maps, 1.0, FoldOptions.merged(None)).config_patch == {"attention_bias": True}

    # a CLI policy overrides the recipe's; targets are the union; config changes need both to allow
    class WithPolicy:
        targets = ["vllm"]
        allow_config_change = True

        class diffusion:  # noqa: N801
            shift_policy = "drop"

    merged = FoldOptions.merged(
        WithPolicy, targets=["llama.cpp"], shift_policy="error", allow_config_change=False
    )
    assert merged == FoldOptions(frozenset({"vllm", "llama.cpp"}), "error", False)
    assert FoldOptions.merged(WithPolicy).shift_policy == "drop"


def test_bake_verify_reuses_the_loaded_model_and_placement(tmp_path, monkeypatch):
    """`bake --verify` verifies with the model bake loaded (same placement), never a second load."""
    from actmerge.kinds.llm import source as llm_source
    from actmerge.placement import Placement

    src = ModelSource("pico", make_pico("llama", tmp_path / "pico"), revision="abc123")
    calls = []
    real = llm_source.load_model

    def counting(source, **kw):
        calls.append((source.path, kw.get("placement")))
        return real(source, **kw)

    monkeypatch.setattr(llm_source, "load_model", counting)
    placement = Placement("cpu", max_memory="cpu=1GiB")
    loaded = pipeline.Loaded(src, placement)
    (res,) = pipeline.bake(
        loaded,
        maps=random_maps(src.config, ["attn_ctx"]),
        options=pipeline.BakeOptions(out=tmp_path / "o", verify_after=True),
        **QUIET,
    )
    assert res.verification.passed
    assert calls == [(src.path, placement)]  # one load, with the bake's placement
    info = json.loads((res.out / "actmerge" / "bake.json").read_text())
    assert info["revision"] == "abc123" and info["placement"]["max_memory"] == "cpu=1GiB"
    # a later `actmerge verify DIR` loads the base with the recorded revision
    seen = {}
    monkeypatch.setattr(llm_source, "resolve", lambda name, rev=None, **kw: seen.update(rev=rev) or src)
    pipeline.verify(res.out, **QUIET)
    assert seen["rev"] == "abc123"


def test_bake_eval_writes_nothing_after_the_rename(tmp_path, monkeypatch):
    """`bake --eval` evaluates before the atomic write: the card already holds the table when the
    directory is renamed into place, and nothing is added afterwards."""
    from actmerge.io import output

    root = tmp_path / "r"
    root.mkdir()
    src = ModelSource("pico", make_pico("gpt2", root / "gpt2"))
    (root / "s.txt").write_text("\n".join(f"you are bad {i}" for i in range(8)))
    (root / "t.txt").write_text("\n".join(f"you are kind {i}" for i in range(8)))
    (root / "p.txt").write_text("hello there\nwhat a day\n")
    (root / "r.yaml").write_text(
        "name: t\nsites: [attn_ctx]\nsource: s.txt\ntarget: t.txt\neval_prompts: p.txt\neval_max_new_tokens: 4\nmin_sentences: 8\n"
    )
    snapshots = {}
    real = output._swap_in

    def recording(tmp, out):
        snapshots["at_rename"] = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*"))
        return real(tmp, out)

    monkeypatch.setattr(output, "_swap_in", recording)
    (res,) = pipeline.bake(
        pipeline.Loaded(src),
        recipe=root / "r.yaml",
        options=pipeline.BakeOptions(out=tmp_path / "o", evaluate_after=True),
        **QUIET,
    )
    after = sorted(p.relative_to(res.out).as_posix() for p in res.out.rglob("*"))
    assert after == snapshots["at_rename"]
    assert "## Evaluation" in (res.out / "README.md").read_text() and res.evaluation


def test_verify_tolerance_ignores_non_float_tensors(tmp_path):
    """An integer buffer in an fp32 checkpoint does not loosen the fp32 tolerance."""
    from safetensors.torch import load_file

    src = ModelSource("pico", make_pico("llama", tmp_path / "pico"))
    (res,) = pipeline.bake(
        pipeline.Loaded(src),
        maps=random_maps(src.config, ["attn_ctx"]),
        options=pipeline.BakeOptions(out=tmp_path / "o"),
        **QUIET,
    )
    state = load_file(str(res.out / "model.safetensors"))
    state["extra.counter"] = torch.arange(4, dtype=torch.int64)  # ignored by transformers
    save_file(state, str(res.out / "model.safetensors"), metadata={"format": "pt"})
    rep = pipeline.verify(res.out, base=pipeline.Loaded(src), **QUIET)
    assert rep.tolerance == 1e-3 and rep.passed


def test_sites_on_pipelines_and_unreachable_hub_ids(tmp_path, monkeypatch):
    from .diffusion_common import tiny_unet
    from .test_diffusion_rows import _build

    _build(tmp_path / "pipe", "StableDiffusionPipeline", {"unet": tiny_unet})
    title, rows = pipeline.sites(str(tmp_path / "pipe"))
    assert "StableDiffusionPipeline" in title and any(r["site"] == "unet_resnet_norm1" for r in rows)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelResolutionError, match="not in the local Hugging Face cache"):
        pipeline.sites("someone/some-diffusion-pipeline")
