"""Chat templates: format prompts and fitting sentences with the model's own template.

Instruct models are served through their chat template, so the behaviour a user sees is the
model's reply to a templated user turn, not a raw continuation. The formats:

- ``user_turns``: each prompt as a user turn followed by the generation prompt (the assistant
  header); generation continues with the assistant's reply, and only the reply is scored.
- ``assistant_turns``: each fitting sentence as the assistant's reply (after the template's own
  default system turn, if any). The returned strings are ``Turn`` objects that remember the
  character span of the sentence, so pooling covers the reply's tokens only (``collect.batches``):
  the template's fixed tokens are identical in source and target and would only dilute the
  difference.
- ``instruction_pairs``: what an instruction changes where the model speaks: each sentence as the
  assistant's reply to a user request, once with the request as is (source) and once with the
  instruction appended (target). The reply is the same on both sides, so the pooled difference is
  the instruction's effect on how the model reads its own reply (an in-context steering vector),
  which a constant shift can then reproduce without the instruction.
- ``raw``: no template (what base models see).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from .errors import RecipeError
from .recipe_files import read_sentences

ChatFit = Literal["raw", "assistant"]  # format_fit; chat_fit: instruction is instruction_pairs


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


def _reply(tok, messages: list[dict], reply: str) -> Turn:
    """``messages`` + ``reply`` as the assistant's turn, remembering the reply's span."""
    text = tok.apply_chat_template([*messages, {"role": "assistant", "content": reply}], tokenize=False)
    start = text.rfind(reply)
    if start < 0:  # the template rewrote the content (e.g. stripped it): pool the whole text
        return Turn(text, (0, len(text)))
    return Turn(text, (start, start + len(reply)))


def assistant_turns(tok, sentences: list[str]) -> list[Turn]:
    """Sentences as assistant replies, each with the span of the sentence in the templated text."""
    _require(tok, "chat-formatted fitting")
    return [_reply(tok, [], s) for s in sentences]


def replies_to(tok, requests: list[str], replies: list[str], suffix: str = "") -> list[Turn]:
    """Reply i as the assistant's answer to request i (cycling through ``requests``) + ``suffix``,
    each pooled over the reply only."""
    _require(tok, "chat-formatted fitting")
    if not requests:
        raise RecipeError("chat_fit: instruction found no requests in chat_requests: add some.")
    return [
        _reply(tok, [{"role": "user", "content": requests[i % len(requests)] + suffix}], reply)
        for i, reply in enumerate(replies)
    ]


def instruction_pairs(
    tok, requests: list[str], replies: list[str], instruction: str
) -> tuple[list[Turn], list[Turn]]:
    """(source, target): every reply after its request sent as is, and with ``instruction`` appended."""
    return replies_to(tok, requests, replies), replies_to(tok, requests, replies, f" {instruction}")


def format_fit(tok, sentences: list[str], mode: ChatFit) -> list[str]:
    return list(sentences) if mode == "raw" else list(assistant_turns(tok, sentences))


# The chat fit modes (a recipe's ``chat_fit:``): name → (tok, source, target, chat section) → the
# (source, target) texts the fit pools, for a model with a chat template and ``chat: true``.
FitMode = Callable[..., tuple[list[str], list[str]]]


def _raw(tok, source: list[str], target: list[str], section) -> tuple[list[str], list[str]]:
    return source, target  # what base models see


def _assistant(tok, source: list[str], target: list[str], section) -> tuple[list[str], list[str]]:
    # fit where a chat model speaks: each sentence as an assistant reply (pooled over the reply only)
    return assistant_turns(tok, source), assistant_turns(tok, target)


def _instruction(tok, source: list[str], target: list[str], section) -> tuple[list[str], list[str]]:
    # the instruction's effect on every reply, source and target sentences alike
    if section.requests is None:
        raise RecipeError("this recipe has no chat_requests: (chat_fit: instruction needs them).")
    return instruction_pairs(
        tok, read_sentences(section.requests), source + target, section.instruction or ""
    )


FIT_MODES: dict[str, FitMode] = {"raw": _raw, "assistant": _assistant, "instruction": _instruction}


def fit_texts(tok, source: list[str], target: list[str], section) -> tuple[list[str], list[str]]:
    """The fitting sentences as the recipe's chat section (``recipe_sections.ChatSection``) places
    them: its fit mode where ``chat: true`` and the model has a template; raw text otherwise."""
    if not section.on or not has_template(tok):
        return source, target
    return FIT_MODES[section.fit](tok, source, target, section)
