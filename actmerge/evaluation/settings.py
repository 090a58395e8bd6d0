"""Evaluation settings: a recipe's, overridden by explicit arguments (``eval_config``), and chat
formatting of the prompts where the model has a template (``chat_prompts``)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelResolutionError, OutputExistsError, RecipeError, UnknownArchitectureError
from ..io.st_format import tensor_index
from ..io.tree import read_config
from ..options import EvalOverrides
from ..recipe import Recipe, read_sentences
from ..recipe_sections import sections_of as sections
from .records import EvalConfig

NEUTRAL_TEXT = Path(__file__).resolve().parent.parent / "data" / "neutral.txt"


def eval_config(recipe: Recipe | None, given: EvalOverrides = EvalOverrides()) -> EvalConfig:
    """Evaluation settings: the recipe's (its eval and chat sections), overridden by the ``given`` ones."""
    sec = sections(recipe) if recipe is not None else None
    ev = sec.eval if sec is not None else None

    def read(path: Path | None):
        return None if path is None else read_sentences(path)

    explicit_prompts = given.prompts
    prompts = list(given.prompts or ()) or (read(ev.prompts) if ev else None)
    if not prompts:
        raise RecipeError("no evaluation prompts: set `eval_prompts:` in the recipe or pass --prompts FILE.")
    sample, limit = given.sample, given.limit
    metrics = list(given.metrics or ()) or (list(ev.metrics) if ev else ["toxicity", "perplexity"])
    neutral = list(given.neutral or ()) or (read(ev.neutral_text) if ev else None) or []
    if "perplexity" in metrics and not neutral:
        neutral = read_sentences(NEUTRAL_TEXT)
    keywords = (
        list(given.keywords or ()) or (read(ev.keywords) if ev and "concept" in metrics else None) or []
    )
    default_tokens = 32 if sample else (ev.max_new_tokens if ev else 24)
    hard = read(ev.prompts_hard) if ev and explicit_prompts is None else None
    return EvalConfig(
        prompts=prompts[:limit] if limit else prompts,
        neutral=neutral,
        metrics=tuple(metrics),
        scorer=given.scorer or (ev.scorer if ev else "profanity"),
        keywords=tuple(keywords),
        max_new_tokens=given.max_new_tokens or default_tokens,
        sample=sample,
        seed=given.seed if given.seed is not None else (ev.seed if ev else 0),
        # --chat requires a template; a recipe's `chat: true` uses it where the model has one
        chat="on" if given.chat else ("auto" if sec is not None and sec.chat.on else "off"),
        splits={"hard": hard[:limit] if limit else hard} if hard else {},
    )


def chat_prompts(cfg: EvalConfig, tok, log=print) -> EvalConfig:
    """Format the evaluation prompts (and every further split, e.g. the hard one) as user turns of
    the chat template when ``cfg.chat`` asks."""
    from dataclasses import replace

    from .. import chat

    if cfg.chat == "off" or (cfg.chat == "auto" and not chat.has_template(tok)):
        if cfg.chat == "auto":
            log("[actmerge] the model has no chat template: evaluating raw continuations")
        return replace(cfg, chat="off")
    splits = {name: chat.user_turns(tok, prompts) for name, prompts in cfg.splits.items()}
    return replace(cfg, prompts=chat.user_turns(tok, cfg.prompts), splits=splits, chat="on")


def check_eval_paths(baked, out: str | Path | None) -> None:
    """Before any slow load: the report directory is not an existing file, and each --baked directory
    is a checkpoint plain transformers can load (config.json valid, a model_type transformers knows)."""
    if out is not None and (Path(out).exists() or Path(out).is_symlink()) and not Path(out).is_dir():
        raise OutputExistsError(f"report directory {out} exists and is not a directory: choose another -o.")
    _check_baked_dirs(baked)


def _check_baked_dirs(baked) -> None:
    """Each --baked directory is a checkpoint plain transformers can load (safetensors weights with
    complete headers, config.json valid, its model_type one transformers knows)."""
    from transformers import CONFIG_MAPPING

    for b in baked:
        b = Path(b)
        if not (b / "config.json").is_file():
            what = "does not exist" if not b.exists() else "has no config.json (not a checkpoint directory)"
            raise ModelResolutionError(
                f"--baked {b}: {what}. Give the output directory of `actmerge bake` (it holds config.json "
                "and the safetensors), e.g. --baked out/gemma-3-270m-detox."
            )
        model_type = read_config(b / "config.json").get("model_type")
        if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
            raise UnknownArchitectureError(
                f"--baked {b}: its config.json has model_type {model_type!r}, which this transformers "
                f"does not know, so it cannot be loaded. Give a checkpoint of a supported model (e.g. the "
                "output of `actmerge bake`), or upgrade transformers if the model is newer."
            )
        weights = sorted(b.glob("*.safetensors"))
        if not weights:
            raise ModelResolutionError(
                f"--baked {b}: no *.safetensors weights in it (not a checkpoint directory). Give the output "
                "directory of `actmerge bake`, e.g. --baked out/gemma-3-270m-detox."
            )
        tensor_index(weights)  # every header readable and complete: a clear error, not a loader's
