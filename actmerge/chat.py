"""Chat templates: format prompts and fitting sentences with the model's own template.

Instruct models are served through their chat template, so the behaviour a user sees is the
model's reply to a templated user turn, not a raw continuation. Three formats:

- ``user_turns``: each prompt as a user turn followed by the generation prompt (the assistant
  header); generation continues with the assistant's reply, and only the reply is scored.
- ``assistant_turns``: each fitting sentence as the assistant's reply (after the template's own
  default system turn, if any). The returned strings are ``Turn`` objects that remember the
  character span of the sentence, so pooling covers the reply's tokens only (``collect.batches``):
  the template's fixed tokens are identical in source and target and would only dilute the
  difference.
- ``raw``: no template (what base models see).
"""

from __future__ import annotations

from typing import Literal

from .errors import RecipeError

ChatFit = Literal["raw", "assistant"]


class Turn(str):
    """A templated text that remembers the character span ``[start, end)`` of its content."""

    span: tuple[int, int]

    def __new__(cls, text: str, span: tuple[int, int]):
        obj = super().__new__(cls, text)
        obj.span = span
        return obj


def has_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def _require(tok, what: str) -> None:
    if not has_template(tok):
        raise RecipeError(
            f"{what} needs the model's chat template, but its tokenizer has none (a base model?): "
            "drop `chat: true` / --chat, or use an instruct model whose tokenizer_config.json or "
            "chat_template.jinja holds a template."
        )


def user_turns(tok, prompts: list[str]) -> list[str]:
    """Prompts as user turns + the generation prompt, as text (no tokenizer special tokens added)."""
    _require(tok, "chat-formatted evaluation")
    return [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]


def assistant_turns(tok, sentences: list[str]) -> list[Turn]:
    """Sentences as assistant replies, each with the span of the sentence in the templated text."""
    _require(tok, "chat-formatted fitting")
    out = []
    for s in sentences:
        text = tok.apply_chat_template([{"role": "assistant", "content": s}], tokenize=False)
        start = text.rfind(s)
        if start < 0:  # the template rewrote the content (e.g. stripped it): pool the whole text
            out.append(Turn(text, (0, len(text))))
        else:
            out.append(Turn(text, (start, start + len(s))))
    return out


def format_fit(tok, sentences: list[str], mode: ChatFit) -> list[str]:
    return list(sentences) if mode == "raw" else list(assistant_turns(tok, sentences))
