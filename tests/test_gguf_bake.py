"""GGUF in, GGUF out (actmerge/gguf_bake.py): a pico Llama / Gemma 3 exported to a Q8_0 GGUF is the
source; baking it into `-o out.gguf` keeps every key/value and every tensor's type and bytes except
the folded norms and the added biases, and llama.cpp runs it like the hooked de-quantised model."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import actmerge
from actmerge import gguf_export, pipeline
from actmerge.errors import NotFoldableError
from actmerge.maps import MapSet
from actmerge.models import ModelSource

from .common import random_maps
from .test_llamacpp import needs_llamacpp, pico

QUIET = dict(progress=False, log=lambda *_: None)


def source_gguf(model_type: str, root: Path, outtype: str = "q8_0") -> Path:
    base = pico(model_type, root / "base")
    if model_type.startswith("gemma"):  # transformers' GGUF loader assumes query_pre_attn_scalar 256
        config = json.loads((base / "config.json").read_text())
        config["head_dim"] = config["query_pre_attn_scalar"] = 256
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
        model.save_pretrained(base)
    return gguf_export.export_gguf(
        base, root / f"src.{outtype}.gguf", outtype=outtype, log=lambda *_: None
    ).out


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read(path: Path):
    import gguf

    r = gguf.GGUFReader(str(path))
    kv = {f.name: f.contents() for f in r.fields.values() if not f.name.startswith("GGUF.")}
    return kv, {t.name: (t.tensor_type, bytes(t.data.tobytes()), t.data) for t in r.tensors}


def norm_maps(config: dict, sites: list[str], shift_sites=(), seed: int = 3) -> MapSet:
    maps = random_maps(config, sites, shifts=False, seed=seed).maps
    if shift_sites:
        maps |= random_maps(config, list(shift_sites), shifts=True, seed=seed + 1).maps
    return MapSet(maps, base_model="pico", method="random")


@needs_llamacpp
@pytest.mark.parametrize(
    "model_type,sites,shift_sites",
    [("llama", ["mlp_in"], ["attn_in"]), ("gemma3_text", ["attn_post", "mlp_post", "attn_in", "mlp_in"], [])],
)
def test_gguf_bake_keeps_types_bytes_metadata(tmp_path, model_type, sites, shift_sites):
    src = source_gguf(model_type, tmp_path)
    config = pipeline.load(str(src), log=lambda *_: None).source.config
    maps = norm_maps(config, sites, shift_sites)
    out = tmp_path / "out.gguf"
    (res,) = pipeline.bake(
        str(src),
        maps=maps,
        options=pipeline.BakeOptions(strengths=[1.0], out=out, targets=["gguf"], verify_after=True),
        **QUIET,
    )
    kv0, t0 = read(src)
    kv1, t1 = read(out)
    assert kv1.pop("actmerge.version") == actmerge.__version__  # the marker `--force` looks for
    kv0.pop("actmerge.version", None)  # the pico source GGUF was written by export-gguf: marked too
    assert kv1 == kv0  # tokenizer, chat template, hyper-parameters: all identical
    assert all(t1[name][0] == t0[name][0] for name in t0)  # every tensor keeps its type
    changed = {name for name in t0 if t1[name][1] != t0[name][1]}
    added = set(t1) - set(t0)
    norms = {n for n in changed if "norm" in n}
    assert changed == norms and len(norms) == 2 * len(sites + shift_sites)  # only the folded norm gains
    assert added == ({f"blk.{i}.attn_{x}.bias" for i in range(2) for x in "qkv"} if shift_sites else set())
    for name in norms:  # stored' = s · stored, in the GGUF's own convention (Gemma stores 1 + g)
        module = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
        if model_type.startswith("gemma"):
            module = {
                "attn_norm": "input_layernorm",
                "post_attention_norm": "post_attention_layernorm",
                "ffn_norm": "pre_feedforward_layernorm",
                "post_ffw_norm": "post_feedforward_layernorm",
            }
        _, layer, kind, _ = name.split(".")
        s = maps.maps[f"model.layers.{layer}.{module[kind]}:output"].at(1.0)[0].numpy()
        assert np.array_equal(t1[name][2], (s * t0[name][2]).astype(np.float32))
    rep = res.verification
    assert rep.passed and rep.baked.max_abs_logit_diff <= rep.tolerance
    assert rep.baked.argmax_agreement >= 0.9


@needs_llamacpp
def test_gguf_bake_requantises_q8_0_and_refuses_what_llamacpp_does_not_load(tmp_path, monkeypatch):
    src = source_gguf("gemma3_text", tmp_path)
    config = pipeline.load(str(src), log=lambda *_: None).source.config
    before = snapshot(tmp_path)
    # a shift at attn_ctx goes into o_proj's bias, which llama.cpp's Gemma 3 does not load
    with pytest.raises(NotFoldableError, match="does not load a bias there"):
        pipeline.bake(
            str(src),
            maps=random_maps(config, ["attn_ctx"], seed=5),
            options=pipeline.BakeOptions(strengths=[1.0], out=tmp_path / "x.gguf"),
            **QUIET,
        )
    # --target gguf refuses a scale that would edit the quantised o_proj
    scale_only = random_maps(config, ["attn_ctx"], shifts=False, seed=5)
    with pytest.raises(NotFoldableError, match="cannot fold exactly into a quantised GGUF"):
        pipeline.bake(
            str(src),
            maps=scale_only,
            options=pipeline.BakeOptions(strengths=[1.0], out=tmp_path / "y.gguf", targets=["gguf"]),
            **QUIET,
        )
    assert snapshot(tmp_path) == before
    # without the target, o_proj's columns are re-quantised to Q8_0 with the deviation reported
    (res,) = pipeline.bake(
        str(src),
        maps=scale_only,
        options=pipeline.BakeOptions(strengths=[1.0], out=tmp_path / "z.gguf"),
        **QUIET,
    )
    notes = " ".join(res.notes)
    assert "2 edited matrices re-quantised to their own types (Q8_0)" in notes
    assert set(res_requantised(res)) == {f"blk.{i}.attn_output.weight" for i in range(2)}
    _, t0 = read(src)
    _, t1 = read(tmp_path / "z.gguf")
    assert all(t1[n][0] == t0[n][0] for n in t0) and set(t1) == set(t0)
    assert {n for n in t0 if t1[n][1] != t0[n][1]} == {f"blk.{i}.attn_output.weight" for i in range(2)}
    # a type neither gguf-py nor llama.cpp's quantiser can write (an i-quant needing an importance
    # matrix) is refused with the remedy, nothing written
    import gguf

    from actmerge import gguf_quantize
    from actmerge.errors import ExportError

    def no_quant(data, qtype):
        raise NotImplementedError(f"Quantization for {qtype.name} is not yet implemented")

    def no_rows(arr, qtype):
        raise ExportError(f"{qtype.name} needs an importance matrix to quantise")

    monkeypatch.setattr(gguf.quants, "quantize", no_quant)
    monkeypatch.setattr(gguf_quantize, "quantize_rows", no_rows)
    before = snapshot(tmp_path)
    with pytest.raises(NotFoldableError, match="--target gguf"):
        pipeline.bake(
            str(src),
            maps=scale_only,
            options=pipeline.BakeOptions(strengths=[1.0], out=tmp_path / "k.gguf"),
            **QUIET,
        )
    assert snapshot(tmp_path) == before


def res_requantised(res) -> dict[str, float]:
    """tensor → max |Δ| of its re-quantised values vs the exact fold, as the bake measured it."""
    return res.gguf.requantised


@needs_llamacpp
def test_k_quant_edits_are_requantised_by_llamacpps_own_quantiser(tmp_path):
    """Q4_K_M (the built-in Gemma's type): an edited Q4_K matrix is re-quantised by llama.cpp's row
    quantiser; an unchanged K-quant matrix comes back byte for byte (Q4_K) or within a fraction of a
    quantisation step; every other tensor is copied unchanged and every type kept."""
    from gguf import quants

    from actmerge.gguf_quantize import quantize_rows

    src = source_gguf("gemma3_text", tmp_path, outtype="q4_k_m")
    _, t0 = read(src)
    assert t0["blk.0.attn_output.weight"][0].name == "Q4_K"
    k_quants = {n: t for n, t in t0.items() if t[0].name.endswith("_K")}
    assert k_quants
    for name, (qt, _, data) in k_quants.items():
        dense = quants.dequantize(data, qt)
        again = quantize_rows(dense, qt)
        assert again.shape == data.shape
        if qt.name == "Q4_K":
            assert np.array_equal(again, data), name
        step = np.abs(dense).max() / (15 if qt.name == "Q4_K" else 63)
        assert np.abs(quants.dequantize(again, qt) - dense).max() <= step, name
    config = pipeline.load(str(src), log=lambda *_: None).source.config
    maps = random_maps(config, ["attn_ctx"], shifts=False, seed=5)
    before = {p.name for p in tmp_path.iterdir()}
    (res,) = pipeline.bake(
        str(src),
        maps=maps,
        options=pipeline.BakeOptions(strengths=[1.0], out=tmp_path / "k.gguf", verify_after=True),
        **QUIET,
    )
    assert {p.name for p in tmp_path.iterdir()} - before == {"k.gguf"}
    # verify: the same edits with the two matrices in float32 run in llama.cpp like the hooked base
    # (the fold is exact); the re-quantised file's own deviation from that reference is reported
    rep = res.verification
    assert rep.passed and rep.exact.max_abs_logit_diff <= rep.tolerance
    assert rep.requantised.max_abs_logit_diff > rep.exact.max_abs_logit_diff
    assert rep.requantised.argmax_agreement >= 0.5
    notes = " ".join(res.notes)
    assert "2 edited matrices re-quantised to their own types (Q4_K)" in notes
    _, t1 = read(tmp_path / "k.gguf")
    assert set(t1) == set(t0) and all(t1[n][0] == t0[n][0] for n in t0)
    edited = {f"blk.{i}.attn_output.weight" for i in range(2)}
    assert {n for n in t0 if t1[n][1] != t0[n][1]} == edited
    # the stored matrix is the exact fold (o_proj's columns × ω) within one Q4_K step of it
    for name in edited:
        qt, _, data = t1[name]
        layer = int(name.split(".")[1])
        omega = maps.maps[f"model.layers.{layer}.self_attn.o_proj:input"].at(1.0)[0].numpy()
        exact = quants.dequantize(t0[name][2], qt) * omega[None, :]
        got = quants.dequantize(data, qt)
        assert np.abs(got - exact).max() == pytest.approx(res_requantised(res)[name], rel=1e-5)
        assert np.abs(got - exact).max() <= np.abs(exact).max() / 15


def test_gguf_output_needs_a_gguf_source_and_never_overwrites_it(tmp_path):
    from actmerge import gguf_bake
    from actmerge.errors import ExportError

    with pytest.raises(ExportError, match="is not a GGUF"):
        gguf_bake.preflight(str(tmp_path), tmp_path / "o.gguf", [1.0], False)
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF")
    with pytest.raises(ExportError, match="source GGUF itself"):
        gguf_bake.preflight(str(src), src, [1.0], True)
    with pytest.raises(ExportError, match="one strength"):
        gguf_bake.preflight(str(src), tmp_path / "o.gguf", [0.5, 1.0], False)


def test_target_gguf_keeps_norm_sites_only(tmp_path):
    from actmerge.fold import FoldOptions
    from actmerge.kinds.llm.fit import gguf_sites
    from actmerge.sites import architecture_for, resolve_sites

    from .common import make_pico

    config = ModelSource("pico", make_pico("gemma3_text", tmp_path / "m")).config
    arch = architecture_for(config)
    sites = resolve_sites(arch, config, ["attn_post", "mlp_post", "attn_ctx"], "all")
    said = []
    kept = gguf_sites(sites, config, FoldOptions(frozenset({"gguf"})), said.append)
    assert {s.name for s in kept} == {"attn_post", "mlp_post"} and "attn_ctx" in said[0]
    assert gguf_sites(sites, config, FoldOptions(), said.append) == sites
    with pytest.raises(NotFoldableError, match="none of the recipe's sites"):
        gguf_sites(
            sites[-1:] if sites[-1].name == "attn_ctx" else [s for s in sites if s.name == "attn_ctx"],
            config,
            FoldOptions(frozenset({"gguf"})),
        )


@needs_llamacpp
def test_export_gguf_quantises_with_llamacpp(tmp_path):
    import gguf

    base = pico("llama", tmp_path / "base")
    out = gguf_export.export_gguf(base, tmp_path / "m.q4_0.gguf", outtype="q4_0", log=lambda *_: None).out
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.0.attn_output.weight"] == "Q4_0" and types["blk.0.attn_norm.weight"] == "F32"
    with pytest.raises(gguf_export.ExportError, match="choose one of"):
        gguf_export.export_gguf(base, tmp_path / "x.gguf", outtype="q9_z", log=lambda *_: None)


def test_verify_of_a_gguf_file_says_how_it_is_verified(tmp_path):
    """`actmerge verify X.gguf`: one line naming the route (`bake … -o X.gguf --verify`), exit 2."""
    from typer.testing import CliRunner

    from actmerge.cli import app

    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    r = CliRunner().invoke(app, ["verify", str(gguf)])
    assert r.exit_code == 2 and "-o X.gguf --verify" in r.output, r.output
    assert "Traceback" not in r.output
