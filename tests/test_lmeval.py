"""`actmerge eval --lm-eval` offline: lm-evaluation-harness's `hf` model on the base and a baked
pico checkpoint, with the tiny local multiple-choice task in tests/data/lmeval (skipped only when
the optional extra actmerge[lmeval] is not installed; CI installs it)."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from actmerge import pipeline
from actmerge.cli import app
from actmerge.models import ModelSource

from .common import make_pico, random_maps

pytest.importorskip("lm_eval")

TASKS = Path(__file__).parent / "data" / "lmeval"


def test_eval_with_a_local_lm_eval_task(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model = make_pico("gpt2", tmp_path / "m")
    src = ModelSource("pico", model)
    (res,) = pipeline.bake(
        pipeline.Loaded(src),
        maps=random_maps(src.config, ["attn_ctx", "mlp_hidden"], seed=3),
        options=pipeline.BakeOptions(strengths=[1.0], out=tmp_path / "baked"),
        progress=False,
        log=lambda *_: None,
    )
    (tmp_path / "p.txt").write_text("hello there\nthe cat\n")
    monkeypatch.chdir(tmp_path)  # the task's data is found from any working directory
    r = CliRunner().invoke(
        app,
        [
            "eval",
            str(model),
            "-o",
            str(tmp_path / "rep"),
            "--strengths",
            "",
            "--baked",
            str(res.out),
            "--prompts",
            str(tmp_path / "p.txt"),
            "--metrics",
            "perplexity",
            "--lm-eval-include",
            str(TASKS),
            "--lm-eval",
            "tinytask",
        ],
    )
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "rep" / "report.json").read_text())["rows"]
    base, baked = rows[0], rows[-1]
    assert base["kind"] == "base" and baked["kind"] == "baked"
    for row in (base, baked):
        assert 0.0 <= row["metrics"]["tinytask:acc"] <= 1.0
    assert baked["baseline"]["tinytask:acc"] == base["metrics"]["tinytask:acc"]
    card = (res.out / "README.md").read_text()
    assert "## lm-evaluation-harness" in card and "tinytask:acc" in card
    assert card.index("## lm-evaluation-harness") < card.index("## Use")
    # an unknown task fails with the remedy, before any model runs
    r = CliRunner().invoke(
        app,
        [
            "eval",
            str(model),
            "-o",
            str(tmp_path / "r2"),
            "--strengths",
            "",
            "--prompts",
            str(tmp_path / "p.txt"),
            "--metrics",
            "perplexity",
            "--lm-eval",
            "no_such_task_xyz",
        ],
    )
    assert r.exit_code != 0 and "--lm-eval-include" in r.output
