"""End to end on the real Gemma-3-270M (slow; runs in CI): bake the detox recipe through the CLI,
reload the checkpoint with plain transformers in a fresh process and verify it against the hooked
model. Its held-out toxicity and perplexity are held by tests/test_claims.py."""

import json

import pytest
from typer.testing import CliRunner

from actmerge import pipeline
from actmerge.cli import app
from actmerge.models import resolve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def baked(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "gemma-3-270m-detox"
    r = CliRunner().invoke(
        app, ["bake", "gemma-3-270m", "--recipe", "detox.yaml", "--strength", "1.0", "-o", str(out)]
    )
    assert r.exit_code == 0, r.output
    return out


def test_config_unchanged_and_plain_transformers_reload(baked):
    source = resolve("gemma-3-270m")
    assert json.loads((baked / "config.json").read_text()) == source.config
    bake = json.loads((baked / "actmerge" / "bake.json").read_text())
    assert bake["config_patch"] == {}
    assert {r["exactness"] for r in bake["fold"]} == {"exact"}
    rep = pipeline.verify(baked, log=lambda *_: None)  # fresh process, no actmerge imported there
    assert rep.passed and rep.max_abs_logit_diff <= 1e-3, rep
    assert rep.argmax_agreement >= 0.99


# The toxicity and perplexity of this bake on the held-out prompts (≥ 4× fewer toxic continuations at
# perplexity ≤ ×1.10, and the README's figures within their noise margins): tests/test_claims.py.
