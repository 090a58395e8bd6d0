"""llama.cpp portability: zero-bias stripping, GGUF export with llama.cpp's own converter, the round
trip in llama-cpp-python (pico models; the real Gemma-3-270M is `slow`) and control vectors.

The converter is fetched once from the pinned llama-cpp-python sdist (or $ACTMERGE_LLAMA_CPP); the
runtime tests need llama-cpp-python itself (CI installs it, see .ci/run) and skip without it."""

import importlib.util
import io
import json
import string
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from actmerge import control_vector, gguf_export, llamacpp, pipeline
from actmerge.cli import app
from actmerge.errors import ExportError, NotFoldableError
from actmerge.maps import AffineMap, MapSet
from actmerge.models import ModelSource
from actmerge.recipes_catalog import BUILTIN_DIR
from actmerge.tolerance import LLAMACPP_PICO

from .common import VOCAB, load, make_pico, random_ids, random_maps

ROOT = Path(__file__).resolve().parent.parent
QUIET = dict(progress=False, log=lambda *_: None)
NEW_TOKENS = 8
# max |Δlogit| transformers vs llama.cpp (GGUF f32) on pico models (logits ~0.4), measured 2026-11-23:
# llama 4e-6 (base 7e-5), gemma3_text 2.5e-4 (base 3.9e-4: ggml's GELU is table-driven)
PICO_TOLERANCE = LLAMACPP_PICO  # the one tolerance table: actmerge/tolerance.py

needs_llamacpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason=f"llama-cpp-python not installed (pip install llama-cpp-python=={gguf_export.LLAMA_CPP_PYTHON})",
)


def with_spm_vocab(path: Path) -> Path:
    """llama.cpp's converter needs a vocabulary it knows: add a tiny sentencepiece tokenizer.model
    (the pico tests feed token ids, so it only has to have the model's vocab size)."""
    import sentencepiece as spm

    text = [string.ascii_letters, string.digits + string.punctuation, "the quick brown fox jumps " * 3] * 20
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_writer=buf,
        vocab_size=VOCAB,
        model_type="bpe",
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (path / "tokenizer.model").write_bytes(buf.getvalue())
    return path


def pico(model_type: str, path: Path) -> Path:
    make_pico(model_type, path)
    config = json.loads((path / "config.json").read_text())
    if "query_pre_attn_scalar" in config:  # llama.cpp's Gemma 3 scales queries by 1/sqrt(head_dim)
        config["query_pre_attn_scalar"] = config["head_dim"]
        (path / "config.json").write_text(json.dumps(config, indent=2))
    return with_spm_vocab(path)


def bake(base: Path, maps: MapSet, out: Path, **kw) -> pipeline.BakeResult:
    (res,) = pipeline.bake(
        pipeline.Loaded(ModelSource("pico", base)),
        maps=maps,
        options=pipeline.BakeOptions(strengths=[1.0], out=out, **kw),
        **QUIET,
    )
    return res


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}


# --- (a) zero-bias stripping ------------------------------------------------------------------


def test_gemma_zero_o_bias_stripped_nonzero_refused(tmp_path):
    base = pico("gemma3_text", tmp_path / "base")
    config = ModelSource("pico", base).config
    # a shift at attn_in → q,k,v biases; attention_bias also makes o_proj expect a (zero) bias
    res = bake(base, random_maps(config, ["attn_in"], seed=1), tmp_path / "qkv")
    assert res.plan.config_patch == {"attention_bias": True}
    baked = tensors(res.out / "model.safetensors")
    o_biases = [f"model.layers.{i}.self_attn.o_proj.bias" for i in range(2)]
    assert all(name in baked and not baked[name].any() for name in o_biases)
    assert baked["model.layers.0.self_attn.q_proj.bias"].abs().max() > 0

    view = tmp_path / "view"
    assert sorted(gguf_export.prepare(res.out, view)) == o_biases
    seen = tensors(view / "model.safetensors")
    assert set(seen) == set(baked) - set(o_biases)
    assert all(torch.equal(seen[k], baked[k]) for k in seen)
    assert not (view / "actmerge").exists() and (view / "tokenizer.model").is_file()

    # a shift at attn_ctx lands in the o_proj bias: llama.cpp would drop it, so export refuses
    res = bake(base, random_maps(config, ["attn_ctx"], seed=2), tmp_path / "o")
    with pytest.raises(ExportError, match=r"o_proj\.bias.*--target llama\.cpp"):
        gguf_export.prepare(res.out, tmp_path / "view2")
    with pytest.raises(ExportError, match="o_proj"):
        gguf_export.export_gguf(res.out, tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()
    # and baking for llama.cpp refuses that shift up front
    with pytest.raises(NotFoldableError, match="llama.cpp"):
        bake(base, random_maps(config, ["attn_ctx"], seed=2), tmp_path / "o2", targets=["llama.cpp"])


def test_sharded_strip_rewrites_index(tmp_path):
    from transformers import AutoModelForCausalLM

    from .common import char_tokenizer, pico_config

    base = tmp_path / "base"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(pico_config("qwen3")).save_pretrained(base, max_shard_size="20KB")
    char_tokenizer().save_pretrained(base)
    config = ModelSource("pico", base).config
    res = bake(base, random_maps(config, ["attn_in"], seed=3), tmp_path / "baked")
    view = tmp_path / "view"
    stripped = gguf_export.prepare(res.out, view)
    assert sorted(stripped) == [f"model.layers.{i}.self_attn.o_proj.bias" for i in range(2)]
    index = json.loads((view / "model.safetensors.index.json").read_text())
    assert not set(stripped) & set(index["weight_map"])
    for name, shard in index["weight_map"].items():
        with safe_open(str(view / shard), "pt") as h:
            assert name in h.keys()


# --- (b) export + round trip in llama.cpp ----------------------------------------------------

PICO_CASES = {
    # every Llama site with a shift: attention_bias + mlp_bias, all seven biases non-zero
    "llama": ["attn_in", "attn_ctx", "attn_out", "mlp_in", "mlp_hidden", "mlp_out"],
    # Gemma 3: q,k,v biases from an attn_in shift (o bias zero, stripped), scales everywhere
    "gemma3_text": ["attn_in", "attn_post", "mlp_in", "mlp_hidden", "mlp_post"],
}


@needs_llamacpp
@pytest.mark.parametrize("model_type", list(PICO_CASES))
def test_pico_roundtrip_in_llamacpp(model_type, tmp_path):
    base = pico(model_type, tmp_path / "base")
    maps = random_maps(ModelSource("pico", base).config, PICO_CASES[model_type], seed=1)
    res = bake(base, maps, tmp_path / "baked")
    if model_type == "llama":
        assert res.plan.config_patch == {"attention_bias": True, "mlp_bias": True}
    exp = gguf_export.export_gguf(res.out, tmp_path / "baked.gguf", log=lambda *_: None)
    ids = [[1, *row] for row in random_ids(4, 12, seed=5).tolist()]
    model = load(base)
    got = llamacpp.run_llamacpp(exp.out, ids, NEW_TOKENS)
    rt = llamacpp.compare_runs(llamacpp.run_transformers(model, ids, NEW_TOKENS, maps, 1.0), got, ids)
    print(model_type, rt)
    assert rt.max_abs_logit_diff <= PICO_TOLERANCE, rt
    assert rt.argmax_agreement == 1.0 and rt.greedy_agreement == 1.0, rt
    # the check can fail: the unsteered model is far from the baked GGUF
    off = llamacpp.compare_runs(llamacpp.run_transformers(model, ids, NEW_TOKENS), got, ids)
    assert off.max_abs_logit_diff > 100 * PICO_TOLERANCE


@needs_llamacpp
def test_cli_export_and_verify_llamacpp(tmp_path, monkeypatch):
    base = pico("llama", tmp_path / "base")
    maps = random_maps(ModelSource("pico", base).config, ["attn_in", "mlp_hidden"], seed=4)
    res = bake(base, maps, tmp_path / "baked")
    runner = CliRunner()
    r = runner.invoke(app, ["export-gguf", str(res.out), "-o", str(tmp_path / "m.gguf"), "--outtype", "f16"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m.gguf").stat().st_size > 0
    r = runner.invoke(app, ["export-gguf", str(res.out), "-o", str(tmp_path / "m.gguf")])
    assert r.exit_code == 2 and "exists" in r.output  # an existing output: OutputExistsError, as everywhere
    monkeypatch.chdir(tmp_path)  # relative paths: the converter runs in another directory
    r = runner.invoke(app, ["export-gguf", "baked", "-o", "rel.gguf"])
    assert r.exit_code == 0 and (tmp_path / "rel.gguf").stat().st_size > 0, r.output
    r = runner.invoke(app, ["verify", str(res.out), "--base", str(base), "--runtime", "llama.cpp", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output[r.output.index("{") :])
    assert rep["runtime"] == "llama.cpp" and rep["passed"]
    assert rep["baked"]["max_abs_logit_diff"] <= PICO_TOLERANCE and rep["baked"]["greedy_agreement"] == 1.0
    assert (res.out / "actmerge" / "verify-llama.cpp.json").is_file()


# --- control vectors --------------------------------------------------------------------------


def post_shift_maps(config: dict, layer: int, seed: int = 0) -> MapSet:
    """A scale and a shift at Gemma's MLP post-norm of ``layer``: the shift has no home in the weights."""
    g = torch.Generator().manual_seed(seed)
    dim = config["hidden_size"]
    key = f"model.layers.{layer}.post_feedforward_layernorm:output"
    return MapSet(
        {key: AffineMap(1 + 0.2 * torch.randn(dim, generator=g), 0.5 * torch.randn(dim, generator=g))},
        base_model="pico",
        method="test",
    )


def test_control_vector_refuses_what_it_cannot_hold(tmp_path):
    base = pico("gemma3_text", tmp_path / "base")
    config = ModelSource("pico", base).config
    with pytest.raises(ExportError, match="layer 0"):  # llama.cpp has no control vector for layer 0
        control_vector.control_vector(post_shift_maps(config, 0), config, 1.0)
    maps = post_shift_maps(config, 1)
    g = torch.Generator().manual_seed(1)
    maps.maps["model.layers.1.post_attention_layernorm:output"] = AffineMap(
        torch.ones(32), torch.randn(32, generator=g)
    )
    with pytest.raises(ExportError, match="attn_post is not the end of a layer"):
        control_vector.control_vector(maps, config, 1.0)
    cv = control_vector.control_vector(maps, config, 0.5, partial=True)
    assert sorted(cv.directions) == [1] and len(cv.elsewhere) == 1
    assert torch.allclose(
        cv.directions[1], 0.5 * maps.maps["model.layers.1.post_feedforward_layernorm:output"].beta
    )


@needs_llamacpp
def test_control_vector_matches_hooked_shift(tmp_path):
    base = pico("gemma3_text", tmp_path / "base")
    config = ModelSource("pico", base).config
    maps = post_shift_maps(config, 1)
    res = bake(base, maps, tmp_path / "baked", shift_policy="drop")  # the scale; the shift is dropped
    assert res.plan.sites[0].exactness == "scale only (shift dropped)"
    gguf = gguf_export.export_gguf(res.out, tmp_path / "baked.gguf", log=lambda *_: None).out
    maps.save(tmp_path / "maps.safetensors")
    cmd = ["export-control-vector", str(tmp_path / "maps.safetensors"), "--model", str(base)]
    r = CliRunner().invoke(app, [*cmd, "-o", str(tmp_path / "cv.gguf")])
    assert r.exit_code == 0, r.output
    import gguf as gguf_py

    reader = gguf_py.GGUFReader(str(tmp_path / "cv.gguf"))
    assert [t.name for t in reader.tensors] == ["direction.1"]
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "controlvector"

    ids = [[1, *row] for row in random_ids(3, 10, seed=7).tolist()]
    model = load(base)
    full = llamacpp.run_transformers(model, ids, NEW_TOKENS, maps, 1.0)  # scale and shift, hooked
    with_cv = llamacpp.compare_runs(
        full, llamacpp.run_llamacpp(gguf, ids, NEW_TOKENS, cvec=tmp_path / "cv.gguf"), ids
    )
    without = llamacpp.compare_runs(full, llamacpp.run_llamacpp(gguf, ids, NEW_TOKENS), ids)
    print("with control vector", with_cv, "\nwithout", without)
    assert with_cv.max_abs_logit_diff <= PICO_TOLERANCE and with_cv.greedy_agreement == 1.0, with_cv
    assert without.max_abs_logit_diff > 10 * PICO_TOLERANCE  # the shift matters: the vector carries it


# --- (c) the real Gemma-3-270M ----------------------------------------------------------------


@pytest.mark.slow
@needs_llamacpp
def test_gemma_detox_llamacpp_matches_transformers(tmp_path):
    out = tmp_path / "gemma-3-270m-detox"
    pipeline.bake(
        "gemma-3-270m",
        recipe="detox",
        options=pipeline.BakeOptions(strengths=[1.0], out=out, targets=["llama.cpp"]),
        **QUIET,
    )
    prompts = (BUILTIN_DIR / "data" / "detox" / "eval_prompts.txt").read_text().splitlines()[:20]
    rep = pipeline.verify(
        out, options=pipeline.VerifyOptions(runtime="llama.cpp", prompts=prompts), log=lambda *_: None
    )
    print(rep.to_json())
    # the tolerance to beat is the unbaked base's own transformers → llama.cpp round trip
    assert rep.base.greedy_agreement >= 0.95, rep.base
    assert rep.baked.greedy_agreement >= 0.95, rep.baked
    assert rep.baked.max_abs_logit_diff <= max(2 * rep.base.max_abs_logit_diff, 1e-3), rep
    assert rep.passed and rep.baked.argmax_agreement >= 0.99


def test_llama_cpp_pin_is_one_version():
    """The converter's sdist, CI's runtime and the `llamacpp` extra are one llama-cpp-python version."""
    pin = f"llama-cpp-python=={gguf_export.LLAMA_CPP_PYTHON}"
    assert pin in (ROOT / ".ci" / "run").read_text()
    assert pin in (ROOT / "pyproject.toml").read_text()


# --- Mistral in the Llama layout ------------------------------------------------------------


def mistral_pico(path: Path, sliding_window: int | None) -> Path:
    pico("mistral", path)
    config = json.loads((path / "config.json").read_text())
    config["sliding_window"] = sliding_window
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def test_as_llama_refuses_binding_sliding_window_and_other_archs(tmp_path):
    base = mistral_pico(tmp_path / "mistral", sliding_window=64)  # < max_position_embeddings (256)
    maps = random_maps(ModelSource("pico", base).config, ["attn_ctx"], seed=1)
    with pytest.raises(ExportError, match="sliding_window=64 < max_position_embeddings=256"):
        bake(base, maps, tmp_path / "o", as_llama=True)
    assert not (tmp_path / "o").exists()
    llama = pico("llama", tmp_path / "llama")
    with pytest.raises(ExportError, match="Mistral checkpoints"):
        bake(
            llama, random_maps(ModelSource("pico", llama).config, ["attn_ctx"]), tmp_path / "o", as_llama=True
        )


def test_as_llama_mistral_shifts_fold_and_reload(tmp_path):
    base = mistral_pico(tmp_path / "mistral", sliding_window=None)
    sites = ["attn_in", "attn_ctx", "attn_out", "mlp_in", "mlp_hidden", "mlp_out"]
    mistral_cfg = ModelSource("pico", base).config
    # Mistral has no bias flags: its shifts are refused ...
    with pytest.raises(NotFoldableError):
        bake(base, random_maps({**mistral_cfg, "model_type": "llama"}, sites, seed=2), tmp_path / "x")
    # ... and fold exactly in the Llama layout
    maps = random_maps({**mistral_cfg, "model_type": "llama"}, sites, seed=2)
    res = bake(base, maps, tmp_path / "baked", as_llama=True)
    config = json.loads((res.out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["attention_bias"] and config["mlp_bias"] and config["sliding_window"] is None
    rep = pipeline.verify(res.out, base=str(base), log=lambda *_: None)  # hooked Mistral vs fresh Llama
    assert rep.passed and rep.max_abs_logit_diff <= 1e-4, rep


@needs_llamacpp
def test_as_llama_mistral_roundtrip_in_llamacpp(tmp_path):
    base = mistral_pico(tmp_path / "mistral", sliding_window=None)
    sites = ["attn_in", "attn_ctx", "mlp_in", "mlp_hidden"]
    maps = random_maps({**ModelSource("pico", base).config, "model_type": "llama"}, sites, seed=3)
    res = bake(base, maps, tmp_path / "baked", as_llama=True)
    exp = gguf_export.export_gguf(res.out, tmp_path / "m.gguf", log=lambda *_: None)
    ids = [[1, *row] for row in random_ids(3, 12, seed=6).tolist()]
    got = llamacpp.run_llamacpp(exp.out, ids, NEW_TOKENS)
    rt = llamacpp.compare_runs(llamacpp.run_transformers(load(base), ids, NEW_TOKENS, maps, 1.0), got, ids)
    assert rt.max_abs_logit_diff <= PICO_TOLERANCE and rt.greedy_agreement == 1.0, rt
