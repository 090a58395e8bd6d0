"""Evaluation: metric functions with known answers, the exact fast nucleus filter, and a sweep on a
pico model (λ = 0 row ≡ base, report schema, the plot)."""

import json
import math

import pytest
import torch
from transformers import TopPLogitsWarper

from actmerge import pipeline
from actmerge.evaluation.metrics import FastTopP, concept_presence, perplexity, profanity_scorer
from actmerge.evaluation.plot import plot
from actmerge.evaluation.records import EvalConfig
from actmerge.evaluation.sweep import SweepRows, run_sweep
from actmerge.evaluation.tables import markdown_table
from actmerge.models import ModelSource

from .common import VOCAB, char_tokenizer, load, make_pico, random_maps


def test_concept_presence_known_answers():
    texts = [
        "He scored a goal!",
        "The goalkeeper dived.",
        "A World Cup final",
        "nothing here",
        "Goals galore",
    ]
    assert concept_presence(texts, ["goal", "world cup"]) == pytest.approx(2 / 5)
    assert concept_presence(texts, ["goal", "goals", "goalkeeper", "world cup"]) == pytest.approx(4 / 5)
    assert concept_presence([], ["x"]) == 0.0


def test_profanity_scorer_orders_texts():
    s = profanity_scorer()(["you are a fucking idiot", "the weather is mild today"])
    assert s[0] > 0.5 > s[1]


def test_perplexity_of_uniform_model_is_vocab_size(tmp_path):
    path = make_pico("llama", tmp_path / "m")
    model, tok = load(path), char_tokenizer()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # logits all zero → uniform → perplexity = |V|
    assert perplexity(model, tok, ["hello world", "a longer sentence here."]) == pytest.approx(
        VOCAB, rel=1e-4
    )


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9])  # 0.9 needs the full-sort fallback at k=64
def test_fast_top_p_matches_transformers(top_p):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 5000, generator=g) * 3
    ref = TopPLogitsWarper(top_p)(None, scores.clone())
    got = FastTopP(top_p, k=64)(None, scores.clone())
    assert torch.equal(torch.isinf(ref), torch.isinf(got))
    assert torch.equal(ref[~torch.isinf(ref)], got[~torch.isinf(got)])


@pytest.fixture(scope="module")
def pico(tmp_path_factory):
    return make_pico("gemma3_text", tmp_path_factory.mktemp("sw") / "g")


def test_sweep_report_and_plot(pico, tmp_path):
    src = ModelSource("pico", pico)
    maps = random_maps(src.config, ["attn_post", "mlp_post"], seed=2)
    (res,) = pipeline.bake(
        pipeline.Loaded(src),
        maps=maps,
        options=pipeline.BakeOptions(strengths=[1.0], out=tmp_path / "b"),
        progress=False,
        log=lambda *_: None,
    )
    model, tok = load(pico), char_tokenizer()
    cfg = EvalConfig(
        prompts=["hello there", "what a day", "the cat"],
        neutral=["some neutral text here."],
        metrics=("toxicity", "concept", "perplexity", "similarity"),
        keywords=("zz",),
        max_new_tokens=6,
    )
    rep = run_sweep(
        model,
        tok,
        cfg,
        SweepRows(maps=maps, strengths=[0.0, 0.5, 1.0], baked=[res.out], include_base=True),
        model_name="pico",
        progress=False,
        log=lambda *_: None,
    )
    labels = [r.label for r in rep.rows]
    assert labels == ["base", "hooked λ=0", "hooked λ=0.5", "hooked λ=1", "baked b"]
    base, zero, one, baked = rep.rows[0], rep.rows[1], rep.rows[3], rep.rows[4]
    assert zero.texts == base.texts and zero.metrics == base.metrics  # λ = 0 is the identity, exactly
    assert base.metrics["perplexity_ratio"] == 1.0 and base.metrics["similarity"] == pytest.approx(
        1.0, abs=1e-5
    )
    assert baked.texts == one.texts  # the baked checkpoint generates what the hooked model does
    assert baked.metrics["perplexity"] == pytest.approx(one.metrics["perplexity"], rel=1e-4)
    assert one.metrics["perplexity"] != base.metrics["perplexity"]
    # KL(base ‖ steered): exactly 0 for the identity, > 0 when steered, the same for baked and hooked
    assert base.metrics["kl"] == 0.0 and zero.metrics["kl"] == 0.0 and zero.metrics["first_token_kl"] == 0.0
    assert one.metrics["kl"] > 0 and one.metrics["first_token_kl"] > 0
    assert rep.rows[2].metrics["kl"] < one.metrics["kl"]  # λ = 0.5 drifts less than λ = 1
    assert baked.metrics["kl"] == pytest.approx(one.metrics["kl"], rel=1e-3, abs=1e-7)
    # baselines: every row carries the base row's values and the ratio to them
    for r in rep.rows:
        assert r.baseline["perplexity"] == base.metrics["perplexity"]
        assert r.ratio["perplexity"] == pytest.approx(r.metrics["perplexity_ratio"])
        assert "kl" not in r.ratio  # baseline 0: no ratio
    data = rep.to_dict()
    rep.save(tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text()) == data
    assert set(data) == {"actmerge_version", "model", "settings", "rows"}
    assert data["settings"]["n_prompts"] == 3 and data["settings"]["max_new_tokens"] == 6
    for row in data["rows"]:
        assert set(row) == {"label", "kind", "strength", "metrics", "samples", "seconds", "baseline", "ratio"}
        assert {
            "toxicity_mean",
            "toxic_fraction",
            "concept_presence",
            "perplexity",
            "perplexity_ratio",
            "similarity",
        } <= set(row["metrics"])
        assert all(math.isfinite(v) for v in row["metrics"].values())
    series = plot(rep, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert series == {
        m: 2
        for m in (
            "toxic_fraction",
            "toxicity_mean",
            "concept_presence",
            "perplexity_ratio",
            "kl",
            "similarity",
        )
    }  # hooked line + baked points per panel
    table = markdown_table(rep)
    assert f"(base {base.metrics['perplexity']:.3g}, ×{one.ratio['perplexity']:.3g})" in table
    assert {"kl", "first_token_kl", "perplexity"} <= {c.strip() for c in table.splitlines()[0].split("|")}


def test_logit_kl_known_answers():
    from actmerge.evaluation.metrics import logit_kl

    tok = char_tokenizer()
    p = torch.log_softmax(torch.tensor([2.0, 0.0, -1.0] + [-30.0] * (VOCAB - 3)), -1)
    q = torch.log_softmax(torch.tensor([0.0, 1.0, -1.0] + [-30.0] * (VOCAB - 3)), -1)

    def const(logp):
        return lambda enc: logp.expand(*enc["input_ids"].shape, VOCAB)

    texts = ["abc", "hello world"]
    assert logit_kl(const(p), const(p), tok, texts) == 0.0
    want = float((p.exp() * (p - q)).sum())
    assert logit_kl(const(p), const(q), tok, texts) == pytest.approx(want, rel=1e-5)
    assert logit_kl(const(p), const(q), tok, texts, last_only=True) == pytest.approx(want, rel=1e-5)


def test_clamped_variant_moves_only_values_inside_the_source_support():
    from actmerge.kinds.llm.hooks import clamped_fn

    scale, shift = torch.tensor([2.0, 2.0]), torch.tensor([1.0, -1.0])
    lo, hi = torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 5.0])
    a = torch.tensor([[[0.5, 3.0], [1.5, -2.0], [-1.0, 4.9]]])
    out = clamped_fn(scale, shift, lo, hi)(a)
    # inside (strictly) → 2a ± 1; outside or on the boundary → unchanged (ml-act's q_0_100 mask)
    assert torch.equal(out, torch.tensor([[[2.0, 5.0], [1.5, -2.0], [-1.0, 8.8]]]))


def test_sweep_adds_clamped_rows_from_a_linear_act_fit(pico, tmp_path):
    from actmerge.kinds.llm.collect import fit
    from actmerge.sites import architecture_for, resolve_sites

    src = ModelSource("pico", pico)
    model, tok = load(pico), char_tokenizer()
    arch = architecture_for(src.config)
    sites = resolve_sites(arch, src.config, ["attn_post", "mlp_post"], "all")
    source = ["you are a total idiot", "shut up you fool", "what a stupid thing", "go away loser"]
    target = ["you are a kind person", "please keep talking", "what a clever thing", "stay a while friend"]
    maps, report = fit(model, tok, sites, source, target, progress=False)
    assert set(report.support) == set(maps)
    for key, (lo, hi) in report.support.items():
        assert (lo <= hi).all() and lo.shape == maps[key].omega.shape
    cfg = EvalConfig(
        prompts=["hello there", "the cat"],
        neutral=["some neutral text here."],
        metrics=("perplexity",),
        max_new_tokens=4,
    )
    from actmerge.maps import MapSet

    rep = run_sweep(
        model,
        tok,
        cfg,
        SweepRows(maps=MapSet(maps), strengths=[0.0, 1.0], support=report.support),
        progress=False,
        log=lambda *_: None,
    )
    labels = [r.label for r in rep.rows]
    assert labels == ["hooked λ=0", "hooked λ=1", "clamped λ=1"]
    hooked, clamped = rep.rows[1], rep.rows[2]
    assert clamped.kind == "clamped"
    # per-token values leave the pooled support, so the clamped variant really differs
    assert clamped.metrics["perplexity"] != hooked.metrics["perplexity"]
    assert plot(rep, tmp_path / "s.png")["perplexity_ratio"] == 2
