"""The bench's lab: what the research scripts share, on actmerge's public API only.

Scripts run as ``python bench/X.py`` (so bench/ is on ``sys.path``) and ``import lab``; actmerge is the
installed package (an editable install of the checkout). Nothing here, and nothing in a bench script,
imports a private name or edits ``sys.path`` (tests/test_bench_fence.py holds that).

- ``RECIPES``, ``DATA``: the built-in recipes and their data files (``recipes_catalog.BUILTIN_DIR``).
- ``read(path)``: the sentences of a txt/jsonl file (``recipe.read_sentences``).
- ``steered(model, maps, lam)``: the maps as hooks at λ; nothing for no maps.
- ``strongest(ratio_at, target)``: the largest measured λ whose perplexity ratio stays ≤ ``target``, by the
  library's search (``evaluation.search.search``: grid, then bisection).
- ``fit(loaded, recipe)``: maps fitted by ``pipeline.fit``, cached as maps files named by the model and
  the recipe's content hash (``$STATS_DIR``, default /tmp).
- ``score(texts, base_texts, keywords)``: (concept presence, mean MiniLM similarity to the base texts).
- ``ChatLab``: SmolLM2-135M-Instruct with football.yaml's chat tuning split (bench/tune_football_chat.py,
  bench/football_chat_probes.py).
"""

from __future__ import annotations

import os
import re
from contextlib import nullcontext
from pathlib import Path

import torch

from actmerge import chat, pipeline
from actmerge.evaluation.budget import Budget
from actmerge.evaluation.metrics import concept_presence, continuations, perplexity, similarity
from actmerge.evaluation.search import search
from actmerge.kinds.llm.hooks import steer
from actmerge.maps import MapSet
from actmerge.models import resolve
from actmerge.recipe import Recipe, load_recipe, read_sentences
from actmerge.recipes_catalog import BUILTIN_DIR
from actmerge.sites import architecture_for

RECIPES = BUILTIN_DIR
DATA = BUILTIN_DIR / "data"
STATS_DIR = Path(os.environ.get("STATS_DIR", "/tmp"))
# strongest(): the grid of evaluation.search.search, wide enough for the late-layer rows (λ up to ~9)
MAX_STRENGTH, STEP, TOL = 16.0, 0.5, 0.02


def read(path: Path) -> list[str]:
    return read_sentences(path)


def steered(model, maps: dict, lam: float):
    return steer(model, MapSet(maps), lam) if maps else nullcontext()


def strongest(ratio_at, target: float) -> tuple[float, float]:
    """(λ, ratio): the largest λ measured with ``ratio_at(λ) ≤ target`` (``evaluation.search.search``; λ = 0 and ratio
    1 when even the smallest λ tried is over)."""
    lam, _met, points = search(
        lambda x: {"perplexity_ratio": ratio_at(x), "kl": 0.0},
        Budget(max_ppl_ratio=target),
        max_strength=MAX_STRENGTH,
        step=STEP,
        tol=TOL,
        allow_extrapolation=True,  # the late-layer rows need λ > 4
    )
    return lam, next((p.cost["perplexity_ratio"] for p in points if p.strength == lam), 1.0)


def fit(loaded, recipe: Recipe, cache: Path | None = STATS_DIR) -> dict:
    """The recipe's maps (site key → AffineMap) for the loaded model, through ``pipeline.fit``; a maps
    file per (model, recipe content hash) in ``cache`` is read instead of fitting again."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", loaded.source.name)
    path = cache / f"lab-{name}-{recipe.content_hash()}.safetensors" if cache else None
    if path is not None and path.is_file():
        return MapSet.load(path).maps
    maps = pipeline.fit(loaded, recipe, progress=False, log=lambda *a: None).maps
    if path is not None:
        maps.save(path)
    return maps.maps


def score(texts: list[str], base_texts: list[str], keywords: list[str]) -> tuple[float, float]:
    sims = similarity(texts, base_texts)
    return concept_presence(texts, keywords), sum(sims) / len(sims)


class ChatLab:
    """SmolLM2-135M-Instruct in chat with football.yaml: its tuning requests (user turns), its tuning
    neutral text, its keywords; perplexity, greedy replies and the λ search under steering."""

    def __init__(self, target: float):
        self.target = target
        self.loaded = pipeline.Loaded(resolve("smollm2-135m"))
        self.model, self.tok = self.loaded.get()
        self.config = self.loaded.source.config
        self.arch = architecture_for(self.config)
        self.recipe = load_recipe(RECIPES / "football.yaml")
        self.keywords = read(self.recipe.path(self.recipe.keywords))
        self.tune_neutral = read(DATA / "neutral_tune.txt")
        self.tune_prompts = chat.user_turns(self.tok, read(DATA / "concept" / "chat_tune_prompts.txt"))

    def ppl(self, maps: dict, lam: float, texts: list[str] | None = None) -> float:
        with torch.inference_mode(), steered(self.model, maps, lam):
            return perplexity(self.model, self.tok, texts or self.tune_neutral)

    def gen(self, maps: dict, lam: float, prompts: list[str]) -> list[str]:
        with torch.inference_mode(), steered(self.model, maps, lam):
            return continuations(
                self.model, self.tok, prompts, max_new_tokens=32, batch_size=30, progress=False
            )

    def fit(self, **update) -> dict:
        """football.yaml's maps with ``update`` applied (``Recipe.model_copy``), via ``lab.fit``."""
        return fit(self.loaded, self.recipe.model_copy(update=update))

    def strongest(self, maps: dict, base_ppl: float) -> tuple[float, float]:
        return strongest(lambda lam: self.ppl(maps, lam) / base_ppl, self.target)
