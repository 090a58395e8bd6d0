"""The strength λ, in one place: what a user typed (``--strength 0.5,1``), the recipe's default for a
model's family, the λ ``actmerge tune`` recorded (``--strength auto``), the rules every λ must pass, and
the names of per-strength outputs.

Every entry point — bake (typed, recipe default, auto, composed recipes), eval, verify, compose,
export-control-vector and tune's ``--max-strength`` — calls ``check``/``one``; nothing else decides
whether a strength is acceptable. The rules: a finite number, ≥ 0, and ≤ ``MAX_STRENGTH`` unless
extrapolation is allowed (norm gains and weights grow λ-fold beyond the fitted transport)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import RecipeError
from .recipe import Recipe
from .recipe_sections import sections_of as sections

MAX_STRENGTH = 4.0  # beyond this, --allow-extrapolation
AUTO = "auto"  # bake --strength auto: the strength `actmerge tune` recorded


def one(lam, *, allow_extrapolation: bool = False, what: str = "strength") -> float:
    """``lam`` as a float that passes the rules, or a one-line ``RecipeError`` saying which rule and
    the remedy. ``what`` names where it came from (``--max-strength``, ``the recipe's strength`` …)."""
    try:
        value = float(lam)
    except (TypeError, ValueError):
        raise RecipeError(f"{what} {lam!r} is not a number: give e.g. 0.5 or 1.0.") from None
    if not math.isfinite(value):
        raise RecipeError(f"{what} {value} is not a finite number: give e.g. 0.5 or 1.0.")
    if value < 0:
        raise RecipeError(
            f"{what} {value:g} < 0: use 0 (identity) to 1 (full transport), or >1 to extrapolate."
        )
    if value > MAX_STRENGTH and not allow_extrapolation:
        raise RecipeError(
            f"{what} {value:g} is far beyond the fitted transport (λ = 1): norm gains and weights would "
            f"grow {value:g}-fold. Use λ ≤ {MAX_STRENGTH:g}, or pass --allow-extrapolation if you mean it."
        )
    return value + 0.0  # -0.0 → 0.0 (one name, one number)


def check(
    strengths: Iterable,
    *,
    allow_extrapolation: bool = False,
    warn: Callable[[str], None] = print,
    unique: bool = True,
    what: str = "strength",
) -> list[float]:
    """Each strength through ``one``; duplicates removed, order kept (``unique=False`` keeps them: one
    per composed recipe or maps file); λ > 1 gets a warning."""
    out: list[float] = []
    for lam in strengths:
        value = one(lam, allow_extrapolation=allow_extrapolation, what=what)
        if not unique or value not in out:
            out.append(value)
    if any(lam > 1 for lam in out):
        warn(f"warning: strength {max(out):g} > 1 extrapolates the transport beyond the target distribution.")
    return out


def is_auto(value: str | None) -> bool:
    return value is not None and value.strip().lower() == AUTO


def parse(value: str | None, *, what: str = "--strength") -> list[float] | None:
    """A typed list (``"0.5,1.0"``; empty items skipped) as numbers; the rules are ``check``'s, applied
    by the verb that uses them. None stays None (the default applies)."""
    if value is None:
        return None
    out: list[float] = []
    for item in (x.strip() for x in value.split(",")):
        if not item:
            continue
        try:
            out.append(float(item))
        except ValueError:
            hint = " ('auto' is for `actmerge bake --strength auto`)" if item.lower() == AUTO else ""
            raise RecipeError(
                f"{what} {value!r}: {item!r} is not a number; give a number or a comma-separated list, "
                f"e.g. 1.0 or 0.5,1.0{hint}."
            ) from None
    return out


def default_for(recipe: Recipe, source) -> float:
    """The recipe's ``strength:``: one λ, or the entry for this model's family (its row name, a
    model_type, else ``default``) when the recipe gives one per family. ``source.config`` is read only
    then (``recipe_sections.sections_of``). Not yet checked: the verb checks it with the others."""
    arch = None
    if isinstance(recipe.strength, dict):
        from .sites import architecture_for

        arch = architecture_for(source.config)
    return sections(recipe, arch).need("strength")


# --strength auto: what `actmerge tune` recorded, one entry per (model, recipe, budget) in the cache


def record_path(model: str, recipe_hash: str) -> Path:
    """Where tune records its choices for (model, recipe): one entry per budget."""
    from .io.markers import cache_dir

    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model)[-80:]
    return cache_dir() / "tuned" / f"{safe}-{recipe_hash}.json"


def remember(result) -> Path:
    """Record the strength ``actmerge tune`` chose (an ``evaluation.records.TuneResult``) for ``bake --strength auto``."""
    from .io.output import atomic_file

    path = record_path(result.model, result.recipe_hash)
    with atomic_file(path, force=True, owned=True, log=lambda _msg: None) as tmp:  # a cache entry
        data = json.loads(path.read_text()) if path.is_file() else {}  # under the lock: no lost entry
        data[result.budget.key()] = result.to_dict()
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    return path


def recall(model: str, recipe_hash: str, budget) -> dict | None:
    """The recorded tuning of this model + recipe for this budget (``evaluation.budget.Budget``), unchecked, or None."""
    path = record_path(model, recipe_hash)
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text()).get(budget.key())
    except (ValueError, AttributeError):
        rec = "unreadable"
    if rec is not None and not isinstance(rec, dict):
        raise RecipeError(f"the tuning record {path} is damaged: delete it and re-run `actmerge tune`.")
    return rec


def from_record(rec: dict, *, where: str, allow_extrapolation: bool = False) -> dict:
    """A tuning record as bake.json and the card keep it (``tuned``), its λ through the same rules as a
    typed one (``where``: the record's file, or "this tuning run"). A budget not met is refused."""
    if not rec.get("met"):
        raise RecipeError(f"--strength auto: {rec.get('note') or f'the budget was not met ({where})'}")
    try:
        lam = one(rec.get("strength"), allow_extrapolation=allow_extrapolation, what="recorded strength")
    except RecipeError as exc:
        raise RecipeError(
            f"--strength auto: {exc} (in {where}). Re-run `actmerge tune` (it records a λ in "
            "0..--max-strength), or give --strength λ."
        ) from None
    try:
        c = rec["chosen"]
        return {
            "strength": lam,
            "budget": rec["budget"],
            "met": rec["met"],
            "cost_on_tuning_text": c["cost"],
            "interval_on_tuning_text": c.get("interval", {}),  # {} in records from before the interval
            rec["metric"] + "_on_tuning_prompts": c["behaviour"],
            "base_" + rec["metric"]: rec["base_behaviour"],
            "n_tune_prompts": rec["n_tune_prompts"],
            "note": rec["note"],
        }
    except (KeyError, TypeError):
        raise RecipeError(
            f"--strength auto: the tuning record {where} is damaged: delete it and re-run `actmerge tune`."
        ) from None


def auto(
    model: str, recipe_hash: str, budget, *, allow_extrapolation: bool = False, log=print
) -> dict | None:
    """``--strength auto``, before any load: the record for (model, recipe, budget) through
    ``from_record``, or None when ``actmerge tune`` recorded nothing for it."""
    rec = recall(model, recipe_hash, budget)
    if rec is None:
        return None
    tuned = from_record(
        rec, where=str(record_path(model, recipe_hash)), allow_extrapolation=allow_extrapolation
    )
    log(f"--strength auto: λ = {tuned['strength']:g} (recorded by actmerge tune within {budget.describe()})")
    return tuned


def text(lam: float) -> str:
    """λ as names and commands write it: the short form (``0.5``, ``1``, ``2.33``) when it reads back as
    the same number, else every digit (``0.5000001``) — so two strengths never share a text."""
    short = f"{lam:g}"
    return short if float(short) == lam else repr(float(lam))


def label(lam: float) -> str:
    """The name of one strength's output among several: ``lambda-0.5`` (hub repos: ``REPO-lambda-0.5``)."""
    return f"lambda-{text(lam)}"


def out_for(out: Path, lam: float, strengths: list[float]) -> Path:
    """Where the bake at ``lam`` goes: ``out``, or ``out/lambda-λ`` when several strengths are baked
    (distinct strengths always get distinct directories: ``text`` is exact)."""
    return out if len(strengths) == 1 else out / label(lam)
