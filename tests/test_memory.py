"""The LinEAS memory estimate (``actmerge/memory.py``): printed before the model loads, and within
20 % of the peak RSS a fit measures in a fresh process (a small Llama whose activations, not the
runtime, dominate)."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from actmerge.kinds.llm.fit import lineas_estimate, recipe_sites
from actmerge.recipe import load_recipe
from actmerge.recipe_sections import sections_of as resolve_sections
from actmerge.sites import architecture_for

from .common import VOCAB, char_tokenizer

WORDS = ["alpha", "beta", "gamma", "delta", "kind", "calm", "rude", "bad"]
RECIPE = """name: mem
method: lineas
sites:
  - site: [attn_in, attn_ctx, mlp_in]
    layers: all
source: src.txt
target: tgt.txt
max_tokens: 128
lineas:
  steps: 2
  batch: 16
"""
MEASURE = """
import sys
from pathlib import Path
import actmerge.fitting
from actmerge.memory import peak_rss
lines = []
actmerge.fitting.fit(sys.argv[1], sys.argv[2], log=lines.append, progress=False)
print(lines[0])
print(peak_rss())
"""


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Hidden 256, MLP 1024, 4 layers; 40 sentences of 128 tokens each way."""
    root = tmp_path_factory.mktemp("mem")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=VOCAB,
        tie_word_embeddings=True,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root)
    char_tokenizer().save_pretrained(root)
    rng = random.Random(0)
    for name in ("src.txt", "tgt.txt"):
        (root / name).write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(40)))
    (root / "r.yaml").write_text(RECIPE)
    return root


def test_lineas_estimate_is_within_20_percent_of_the_measured_peak(small):
    config = json.loads((small / "config.json").read_text())
    recipe = load_recipe(small / "r.yaml")
    sites = recipe_sites(recipe, config)
    assert resolve_sections(recipe, architecture_for(config)).need("lineas").batch == 16
    estimate = lineas_estimate(recipe, config, sites, 16, 40, small)
    assert estimate.activations > estimate.runtime / 2  # the fit, not the runtime, is measured
    res = subprocess.run(
        [sys.executable, "-c", MEASURE, str(small), str(small / "r.yaml")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    first, peak = res.stdout.splitlines()[:2]
    assert first == estimate.describe(16, 128)  # the fit's first line: before the model loads
    assert abs(estimate.total - int(peak)) <= 0.2 * int(peak), (estimate, int(peak))


def test_the_estimate_counts_the_longest_sentence_not_max_tokens(small, tmp_path):
    """A batch is padded to its own longest sentence: short sentences under ``max_tokens: 128`` are
    estimated at their own length (detox's comments are ≤ 23 Gemma tokens under ``max_tokens: 64``)."""
    from transformers import AutoTokenizer

    import actmerge.fitting

    rng = random.Random(1)
    for name in ("src.txt", "tgt.txt"):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) for _ in range(40)]
        (tmp_path / name).write_text("\n".join(lines))
    (tmp_path / "r.yaml").write_text(RECIPE.replace("steps: 2", "steps: 1"))
    tok = AutoTokenizer.from_pretrained(str(small))
    texts = (tmp_path / "src.txt").read_text().splitlines() + (tmp_path / "tgt.txt").read_text().splitlines()
    want = max(len(tok(t)["input_ids"]) for t in texts)
    assert want < 128
    lines = []
    actmerge.fitting.fit(str(small), tmp_path / "r.yaml", log=lines.append, progress=False)
    assert f"(batch 16 × {want} tokens)" in lines[0]


def test_peak_rss_is_the_childs_own_not_the_parents():
    """``ru_maxrss`` survives exec: a fit measured from a test runner holding 5 GB reported 5 GB
    (CI, 2026-12-06). ``peak_rss`` reads this image's high-water mark only."""
    code = "from actmerge.memory import peak_rss; print(peak_rss())"

    def child() -> int:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return int(run.stdout)

    alone = child()  # the child's own peak (it imports torch: ~220-290 MB)
    ballast = bytearray(1024 * 2**20)
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # touch every page: 1 GiB more resident here
    beside = child()
    status = Path("/proc/self/status").read_text()
    here = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) * 1024
    del ballast
    # ru_maxrss would report at least this runner's resident size (> 1 GiB while the ballast lives)
    assert beside < here and beside < alone + 256 * 2**20, (alone, beside, here)


def test_estimate_scales_with_batch_ranks_and_model():
    config = {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
    }
    from actmerge.memory import lineas_memory, parameter_count

    assert abs(parameter_count(None, config) - 1_235_814_400) < 1e6  # Llama-3.2-1B
    one = lineas_memory(config, site_dims=[2048] * 48, batch=32, tokens=64, n_target=256)
    two = lineas_memory(config, site_dims=[2048] * 48, batch=32, tokens=64, n_target=256, ranks=2)
    assert one.weights == two.weights and abs(two.activations * 2 - one.activations) < 1e-3 * one.activations
    assert "per process (2 processes, 16 sentences each)" in two.describe(32, 64, 2)
