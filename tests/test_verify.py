"""verify: the hooked base model vs the baked checkpoint in a fresh process that loads only the
weights (no tokenizer, no generation), reusing an already loaded base model, with progress lines."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from actmerge import pipeline
from actmerge.cli import app
from actmerge.kinds.llm.verify import DEFAULT_PROMPTS, reference, verify_transformers
from actmerge.models import ModelSource
from actmerge.options import VerifyOptions
from actmerge.placement import Placement

from .common import char_tokenizer, load, make_pico, random_maps


@pytest.fixture(scope="module")
def baked(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    path = make_pico("llama", root / "llama")
    source = ModelSource("pico", path)
    maps = random_maps(source.config, ["attn_ctx", "mlp_in", "mlp_hidden"], seed=3)
    loaded = pipeline.Loaded(source, "cpu")
    (res,) = pipeline.bake(
        loaded,
        maps=maps,
        options=pipeline.BakeOptions(strengths=[1.0], out=root / "out"),
        progress=False,
        log=lambda *_: None,
    )
    return loaded, res.out


def test_verify_reuses_the_loaded_base_and_logs_progress(baked, monkeypatch):
    loaded, out = baked
    loaded.get()
    from actmerge.kinds.llm import source as llm_source

    monkeypatch.setattr(
        llm_source, "load_model", lambda *a, **k: pytest.fail("the base model was loaded again")
    )
    lines = []
    rep = pipeline.verify(out, base=loaded, log=lines.append)
    assert rep.passed and rep.max_abs_logit_diff <= 1e-4
    assert rep.argmax_agreement == 1.0 and rep.greedy_agreement == 1.0
    assert json.loads((out / "actmerge" / "verify.json").read_text())["passed"]
    assert sum(line.startswith("verify:") for line in lines) >= 3  # progress, phase by phase
    maps = pipeline.MapSet.load(out / "actmerge" / "maps.safetensors")
    with_continuation = verify_transformers(
        out, loaded.get, maps, 1.0, DEFAULT_PROMPTS, 1e-4, log=print, new_tokens=4
    )
    assert with_continuation.passed and with_continuation.greedy_agreement == 1.0


def test_fresh_process_needs_only_the_weights_and_catches_a_bad_one(baked, tmp_path):
    loaded, out = baked
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for f in copy.glob("tokenizer*"):
        f.unlink()  # the fresh process gets token ids: it never loads a tokenizer
    (copy / "special_tokens_map.json").unlink(missing_ok=True)
    assert pipeline.verify(copy, base=loaded, log=lambda *_: None).passed
    (weights,) = copy.glob("*.safetensors")
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("mlp.down_proj.weight"))
    tensors[name] = tensors[name] * 3  # one wrong tensor
    save_file(tensors, weights, metadata={"format": "pt"})
    rep = pipeline.verify(copy, base=loaded, log=lambda *_: None)
    assert not rep.passed and rep.max_abs_logit_diff > rep.tolerance


def test_reference_masks_tokens_after_the_end_of_sequence(baked):
    loaded, _ = baked
    model = load(loaded.source.path)
    tok = char_tokenizer()
    model.generation_config.eos_token_id = None
    ref = reference(model, tok, DEFAULT_PROMPTS[:3], pipeline.MapSet({}), 1.0, new_tokens=6)
    seq = ref["input_ids"]
    n = seq.shape[1] - 6
    first = int(seq[0, n])  # call the first generated token of prompt 0 the end of sequence
    model.generation_config.eos_token_id = first
    ref = reference(model, tok, DEFAULT_PROMPTS[:3], pipeline.MapSet({}), 1.0, new_tokens=6)
    gen_mask = ref["attention_mask"][:, n:]
    assert gen_mask[0].tolist()[0] == 1 and gen_mask[0, 1:].sum() == 0  # kept up to the first EOS
    assert int(ref["positions"].sum()) == ref["logits"].shape[0] == ref["greedy"].shape[0]
    # greedy positions: each prompt's last one and one per kept generated token
    assert int(ref["greedy"].sum()) == int(gen_mask.sum()) + 3
    assert torch.isfinite(ref["logits"]).all()


def test_verify_under_a_memory_budget_agrees_with_the_in_memory_verify(baked, tmp_path, monkeypatch):
    """A budget (50 KB) below the pico model (107 KB in float32): the base runs with layers on disk, is
    freed, then the fresh process loads the checkpoint under the same budget — the same logits."""
    loaded, out = baked
    in_memory = pipeline.verify(out, base=loaded, log=lambda *_: None)
    from actmerge.kinds.llm import source as llm_source

    maps_of = []
    load_model = llm_source.load_model

    def spy(*a, **k):
        model, tok = load_model(*a, **k)
        maps_of.append(dict(getattr(model, "hf_device_map", {})))
        return model, tok

    monkeypatch.setattr(llm_source, "load_model", spy)
    budget = Placement("cpu", max_memory="cpu=50KB", offload_folder=tmp_path / "offload")
    lines = []
    rep = pipeline.verify(
        out, base=str(loaded.source.path), options=VerifyOptions(placement=budget), log=lines.append
    )
    assert maps_of and "disk" in maps_of[0].values()  # the base did not fit the budget
    assert any("base freed" in line for line in lines)  # one model at a time
    assert rep.passed and rep.n_positions == in_memory.n_positions
    assert rep.max_abs_logit_diff == pytest.approx(in_memory.max_abs_logit_diff, abs=1e-7)


def test_verify_with_a_budget_too_small_for_one_layer_says_so(baked, tmp_path):
    loaded, out = baked
    before = sorted(p.name for p in out.rglob("*"))
    r = CliRunner().invoke(
        app, ["verify", str(out), "--base", str(loaded.source.path), "--max-memory", "cpu=1KB"]
    )
    assert r.exit_code == 2, r.output
    (line,) = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert "less than one layer" in line and "Raise it to at least 1MiB" in line, line
    assert "Traceback" not in r.output and sorted(p.name for p in out.rglob("*")) == before
