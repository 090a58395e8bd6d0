"""The cost of steering as drift: KL(base ‖ steered) of the next-token distributions per token on the
neutral text (``kl``) and at the first token after short neutral prompts (``first_token_kl``)."""

from __future__ import annotations

from ..kinds.llm.hooks import steer
from ..placement import input_device
from .metrics import logit_kl, neutral_prompts
from .records import EvalConfig


def wants_kl(cfg: EvalConfig) -> bool:
    """KL rows are measured with perplexity on neutral text (and ``cfg.kl``)."""
    return cfg.kl and "perplexity" in cfg.metrics and bool(cfg.neutral)


def steered_fn(model, maps, lam, clamp):
    def forward(enc):
        with steer(model, maps, lam, clamp):
            return model(**enc).logits

    return forward


def drift(model, steered, tok, cfg: EvalConfig) -> dict[str, float]:
    """KL(base ‖ steered) per token on the neutral text and at the first token after neutral prompts;
    ``model`` un-hooked is the base, ``steered(enc)`` gives the steered logits."""
    device = input_device(model)

    def base(enc):
        return model(**enc).logits

    return {
        "kl": logit_kl(base, steered, tok, cfg.neutral, device=device),
        "first_token_kl": logit_kl(
            base, steered, tok, neutral_prompts(cfg.neutral), device=device, last_only=True
        ),
    }
