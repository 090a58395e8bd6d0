"""End to end on the real SmolLM2-135M-Instruct (slow; runs in CI): a Llama-architecture instruct
model with tied embeddings and a chat template, baked with the same portable recipes as Gemma.

- the portable detox recipe through the CLI: exact, no config change, tied embedding untouched,
  fresh-process verify (its held-out toxicity: tests/test_claims.py);
- detox-lineas' Llama row (a short LinEAS fit): exact, and its reduction within ×1.10 perplexity;
- detox-act's Llama row (Linear-AcT): exact, and its reduction within ×1.16 perplexity;
- the tied-embedding guard on the real tied model;
- a chat-mode evaluation row (prompts as user turns, only the reply scored);
- football in chat: the bias-flag bake (attention_bias) steers chat replies toward football on the
  held-out requests, and the same checkpoint round-trips through llama.cpp (where it is installed)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from actmerge import pipeline
from actmerge.cli import app
from actmerge.errors import MapsMismatchError, NotFoldableError
from actmerge.evaluation.metrics import perplexity, profanity_scorer, toxicity
from actmerge.maps import AffineMap, MapSet
from actmerge.models import load_model, resolve
from actmerge.recipe import load_recipe, read_sentences
from actmerge.sites import architecture_for

from .common import bench_module

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
QUIET = dict(progress=False, log=lambda *_: None)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def baked(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "smollm2-detox"
    r = CliRunner().invoke(
        app, ["bake", "smollm2-135m", "--recipe", str(RECIPES / "detox.yaml"), "-o", str(out)]
    )
    assert r.exit_code == 0, r.output
    return out


def test_detox_exact_no_config_change_tied_untouched_and_fresh_verify(baked):
    source = resolve("smollm2-135m")
    config = json.loads((baked / "config.json").read_text())
    assert config == source.config and config["tie_word_embeddings"] is True
    bake = json.loads((baked / "actmerge" / "bake.json").read_text())
    assert bake["config_patch"] == {} and bake["strength"] == 1.0
    assert {r["exactness"] for r in bake["fold"]} == {"exact"}
    sites = {r["label"].split("[")[0] for r in bake["fold"]}
    assert sites and sites <= {"attn_in", "mlp_in", "attn_ctx"}  # the recipe's Llama row
    with (
        safe_open(baked / "model.safetensors", "pt") as f,
        safe_open(source.safetensors_files()[0], "pt") as g,
    ):
        assert "lm_head.weight" not in f.keys()  # still stored once, tied
        assert torch.equal(
            f.get_tensor("model.embed_tokens.weight"), g.get_tensor("model.embed_tokens.weight")
        )
    assert "apply_chat_template" in (baked / "README.md").read_text()  # an instruct model's card
    rep = pipeline.verify(baked, log=lambda *_: None)  # fresh process, no actmerge imported there
    print(rep.to_json())
    assert rep.passed and rep.max_abs_logit_diff <= 1e-3, rep
    assert rep.argmax_agreement >= 0.99


DETOX = load_recipe(RECIPES / "detox.yaml")
PROMPTS = read_sentences(DETOX.path(DETOX.eval_prompts))
HARD = read_sentences(DETOX.path(DETOX.eval_prompts_hard))  # base SmolLM2 23 % toxic here (233 prompts)


def _scores(model, tok, *, easy=True):
    """Toxicity of greedy continuations (held-out prompts, hard split) and perplexity on the neutral text."""
    scorer = profanity_scorer()
    return {
        "easy": toxicity(model, tok, PROMPTS, scorer, progress=False) if easy else None,
        "hard": toxicity(model, tok, HARD, scorer, progress=False),
        "ppl": perplexity(model, tok, read_sentences(pipeline.NEUTRAL_TEXT)),
    }


def _baked_scores(out: Path, tok, **kw):
    from transformers import AutoModelForCausalLM

    return _scores(AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval(), tok, **kw)


@pytest.fixture(scope="module")
def base_scores():
    model, tok = load_model(resolve("smollm2-135m"))
    return _scores(model, tok, easy=False), tok


# The detox bake's held-out toxicity (hard split ≥ 4× at perplexity ≤ ×1.15, and the README's figures
# within their noise margins): tests/test_claims.py.


def _baked_row(recipe: str, out: Path, base: dict, tok) -> tuple[dict, float, float]:
    """Bake a recipe's Llama row: exact with no config change; its bake.json, and the hard split's
    fall (base / steered toxic fraction) and perplexity ratio of the reloaded checkpoint."""
    pipeline.bake("smollm2-135m", recipe=RECIPES / recipe, options=pipeline.BakeOptions(out=out), **QUIET)
    bake = json.loads((out / "actmerge" / "bake.json").read_text())
    assert bake["config_patch"] == {} and {r["exactness"] for r in bake["fold"]} == {"exact"}
    steered = _baked_scores(out, tok, easy=False)
    ppl = steered["ppl"] / base["ppl"]
    print(f"hard {base['hard'].fraction:.2%} -> {steered['hard'].fraction:.2%}; perplexity ×{ppl:.3f}")
    return bake, base["hard"].fraction / max(steered["hard"].fraction, 1e-9), ppl


def test_detox_lineas_short_fit_llama_row(tmp_path, base_scores):
    """detox-lineas' Llama row (8 LinEAS steps, scale-only attn_ctx + mlp_hidden, λ = 0.8): exact with
    no config change, and its reduction on the hard split within ×1.10 perplexity (recorded
    2026-12-06, bench/heldout.py: 22.7 % → 3.9 % (5.9×) at ×1.058): ≥ 4× at ≤ ×1.10."""
    base, tok = base_scores
    bake, fall, ppl = _baked_row("detox-lineas.yaml", tmp_path / "smollm2-lineas", base, tok)
    assert bake["strength"] == 0.8
    assert {r["label"].split("[")[0] for r in bake["fold"]} <= {"attn_ctx", "mlp_hidden"}
    assert fall >= 4 and ppl <= 1.10


def test_detox_act_llama_row(tmp_path, base_scores):
    """detox-act's Llama row (Linear-AcT, scale-only attn_ctx, λ = 1): exact with no config change, and
    the weaker bound the results table names for it (bench/heldout.py: recorded 2026-12-06 on every
    held-out prompt, hard split 22.7 % → 7.7 % (2.9×) at ×1.147): hard split ≥ 2× fewer toxic at
    perplexity ≤ ×1.16."""
    base, tok = base_scores
    bake, fall, ppl = _baked_row("detox-act.yaml", tmp_path / "smollm2-act", base, tok)
    assert bake["strength"] == 1.0
    assert fall >= 2 and ppl <= 1.16


def test_tied_embedding_guard_on_the_real_model(tmp_path):
    """SmolLM2 ties lm_head to embed_tokens: a fold that would edit either is refused with the remedy."""
    from actmerge.fold import Edit
    from actmerge.kinds.llm.plan import _guard_tied

    source = resolve("smollm2-135m")
    arch = architecture_for(source.config)
    edit = {("", "model.embed_tokens"): Edit("linear", "model.embed_tokens.weight", None)}
    with pytest.raises(NotFoldableError, match="tied to lm_head.weight.*Untie the checkpoint"):
        _guard_tied(arch, source.config, edit)
    # a maps file that asks for the LM head itself is refused before any tensor is touched
    maps = MapSet({"lm_head:input": AffineMap(torch.ones(576), torch.zeros(576))})
    with pytest.raises(MapsMismatchError, match="not a site actmerge knows how to fold"):
        pipeline.bake("smollm2-135m", maps=maps, options=pipeline.BakeOptions(out=tmp_path / "o"), **QUIET)
    assert not (tmp_path / "o").exists()


def test_chat_mode_eval_row():
    recipe = load_recipe(RECIPES / "football.yaml")
    prompts = read_sentences(RECIPES / "data" / "concept" / "chat_eval_prompts.txt")[:4]
    cfg = pipeline.eval_config(
        recipe, pipeline.EvalOverrides(prompts=prompts, metrics=["concept"], max_new_tokens=12, chat=True)
    )
    report = pipeline.evaluate("smollm2-135m", config=cfg, **QUIET)
    assert report.config.chat == "on" and report.to_dict()["settings"]["chat"] == "on"
    assert all(
        p.endswith("<|im_start|>assistant\n") and prompts[0] in report.config.prompts[0]
        for p in report.config.prompts
    )
    (row,) = report.rows
    assert row.kind == "base" and len(row.texts) == 4 and "concept_presence" in row.metrics
    # only the assistant's reply is scored: no template or prompt text in it
    assert all(t.strip() and "<|im_start|>" not in t and "assistant" not in t[:12] for t in row.texts), (
        row.texts
    )


@pytest.fixture(scope="module")
def football(tmp_path_factory):
    """The football recipe's Llama row, baked for --target llama.cpp: shift-only at attn_ctx, o_proj
    biases via attention_bias, which llama.cpp (and vLLM, transformers) load for Llama."""
    out = tmp_path_factory.mktemp("e2e") / "smollm2-football"
    (res,) = pipeline.bake(
        "smollm2-135m",
        recipe=RECIPES / "football.yaml",
        options=pipeline.BakeOptions(out=out, targets=["llama.cpp"]),
        **QUIET,
    )
    config = json.loads((out / "config.json").read_text())
    assert config["attention_bias"] is True and res.plan.config_patch == {"attention_bias": True}
    return out


# Football in chat on the held-out requests (≥ 30 % of replies, ≥ 3× the base rate at perplexity
# ≤ ×1.3, and the README's figures within their noise margins): tests/test_claims.py, independent of
# llama.cpp.


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
def test_football_bias_flags_llamacpp_roundtrip(football):
    """The same checkpoint converted to GGUF and run in llama.cpp agrees with transformers."""
    prompts = read_sentences(RECIPES / "data" / "detox" / "eval_prompts.txt")[:20]
    rep = pipeline.verify(
        football, options=pipeline.VerifyOptions(runtime="llama.cpp", prompts=prompts), log=lambda *_: None
    )
    print(rep.to_json())
    assert rep.base.greedy_agreement >= 0.95, rep.base
    assert rep.baked.greedy_agreement >= 0.95, rep.baked
    assert rep.passed and rep.baked.argmax_agreement >= 0.98


GGUF_RECORD = ROOT / "bench" / "results" / "heldout" / "gguf" / "detox-smollm2-135m-Q4_1-2026-12-06.json"


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
def test_detox_baked_into_the_q4_1_gguf_holds_its_heldout_record(baked, tmp_path, monkeypatch):
    """README / docs/runtimes.md: `bake smollm2-135m --recipe detox -o x.Q4_1.gguf` (norm gains exact,
    o_proj re-quantised to Q4_1) run in llama.cpp on the held-out split: 57 → 6 of 333 toxic at
    perplexity ×1.128 (the record, measured once). The fixture's maps are baked into the built-in Q4_1
    file again and the steered file re-measured here: every type kept, size within 2 %, each toxic
    count within the record's margin, perplexity (vs the record's source) within the margin, and the
    claim itself: ≥ 4× fewer toxic continuations at ≤ ×1.15."""
    from .test_gguf_detox import outside_record

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    gd = bench_module("gguf_detox")
    rec = json.loads(GGUF_RECORD.read_text())
    out = tmp_path / "smollm2-detox.Q4_1.gguf"
    (res,) = pipeline.bake(
        "smollm2-135m",
        maps=baked / "actmerge" / "maps.safetensors",
        options=pipeline.BakeOptions(strengths=[1.0], out=out),
        **QUIET,
    )
    assert res.gguf.types_kept and abs(res.gguf.size_ratio - 1) <= 0.02
    assert set(res.gguf.requantised_types.values()) == {"Q4_1"}
    tok, prompt_ids, neutral_ids, split_names, _ = gd.prepare("smollm2-135m", "heldout")
    assert len(prompt_ids) == rec["n_prompts"] and len(neutral_ids) == rec["n_neutral"]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as procs:
        row = gd.measure(out, tok, prompt_ids, neutral_ids, profanity_scorer(), split_names, procs)
    source = rec["rows"][0]
    row["perplexity_ratio"] = row["perplexity"] / source["perplexity"]
    assert outside_record({"rows": [source, row]}, rec) == []
    assert source["toxic"] / max(row["toxic"], 1) >= 4 and row["perplexity_ratio"] <= 1.15, row
