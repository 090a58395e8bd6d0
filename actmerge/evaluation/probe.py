"""The tuning split and hooked previews on it: the cost of λ on the tuning neutral text and the
behaviour on the tuning prompts (never the eval prompts)."""

from __future__ import annotations

from contextlib import nullcontext

from ..errors import RecipeError
from ..kinds.llm.hooks import steer
from ..placement import input_device
from ..recipe import Recipe, read_sentences
from ..recipe_sections import sections_of as sections
from .budget import Cost, TextCosts
from .metrics import concept_presence, continuations, get_scorer, logit_kl, neutral_prompts, text_kl, text_nll


def tuning_split(recipe: Recipe) -> tuple[list[str], list[str]]:
    """The recipe's tuning prompts and tuning neutral text (its tune section; never its eval prompts)."""
    tune = sections(recipe).tune
    missing = [f for f, p in (("tune_prompts", tune.prompts), ("tune_neutral", tune.neutral)) if p is None]
    if missing:
        raise RecipeError(
            f"recipe {recipe.name!r} has no {' / '.join(missing)}: tuning needs its own split, never the "
            "eval prompts. Add e.g. `tune_prompts: data/detox/tune_prompts.txt` and "
            "`tune_neutral: data/neutral_tune.txt` to the recipe."
        )
    return read_sentences(tune.prompts), read_sentences(tune.neutral)


def behaviour_name(recipe: Recipe) -> str:
    metrics = sections(recipe).eval.metrics
    if "toxicity" in metrics:
        return "toxic_fraction"
    if "concept" in metrics:
        return "concept_presence"
    raise RecipeError(f"recipe {recipe.name!r}: tuning needs a behaviour metric (toxicity or concept).")


class HookedProbe:
    """Hooked previews of ``maps`` on the base model: cost on the neutral text, behaviour on prompts."""

    def __init__(self, loaded, recipe: Recipe, maps, prompts: list[str], neutral: list[str], progress=True):
        self.model, self.tok = loaded.get()
        self.recipe, self.maps, self.prompts, self.neutral = recipe, maps, prompts, neutral
        self.progress, self.eval = progress, sections(recipe).eval
        self.scorer = get_scorer(self.eval.scorer) if "toxicity" in self.eval.metrics else None
        concept = self.eval.keywords and "concept" in self.eval.metrics  # as Recipe.used_paths ships it
        self.keywords = read_sentences(self.eval.keywords) if concept else []
        self.base_nll = text_nll(self.model, self.tok, neutral)  # per text: (NLL, tokens)
        self.cache: dict[float, float] = {}

    def text_costs(self, lam: float) -> TextCosts:
        """The cost of λ per neutral text: ΔNLL and KL sums with their token counts (``TextCosts``)."""
        tokens = tuple(n for _, n in self.base_nll)
        if lam == 0:
            zero = (0.0,) * len(tokens)
            return TextCosts(tokens, zero, tokens, zero)
        with steer(self.model, self.maps, lam):
            steered_nll = text_nll(self.model, self.tok, self.neutral)

        def base(enc):
            return self.model(**enc).logits

        def steered(enc):
            with steer(self.model, self.maps, lam):
                return self.model(**enc).logits

        device = input_device(self.model)
        kl = text_kl(base, steered, self.tok, self.neutral, device=device)
        first = logit_kl(
            base, steered, self.tok, neutral_prompts(self.neutral), device=device, last_only=True
        )
        return TextCosts(
            tokens=tokens,
            nll_delta=tuple(s - b for (s, _), (b, _) in zip(steered_nll, self.base_nll, strict=True)),
            kl_positions=tuple(n for _, n in kl),
            kl=tuple(k for k, _ in kl),
            first_token_kl=first,
        )

    def cost(self, lam: float) -> Cost:
        """The point estimates of ``text_costs``: perplexity ratio, KL, first-token KL."""
        return self.text_costs(lam).point()

    def behaviour(self, lam: float) -> float:
        if lam in self.cache:
            return self.cache[lam]
        ctx = steer(self.model, self.maps, lam) if lam else nullcontext()
        with ctx:
            texts = continuations(
                self.model,
                self.tok,
                self.prompts,
                max_new_tokens=self.eval.max_new_tokens,
                seed=self.eval.seed,
                progress=self.progress,
            )
        if self.scorer is not None:
            scores = self.scorer(texts)
            value = sum(s > 0.5 for s in scores) / max(len(scores), 1)
        else:
            value = concept_presence(texts, self.keywords)
        self.cache[lam] = value
        return value
