"""The files a recipe reads: its YAML, and the data files its path fields name (sentences, prompts,
keywords …). Every check here runs before any model load.

Rule: a recipe's data files live inside the recipe's own directory, or inside the built-in recipes'
directory (public data shipped with actmerge, e.g. a symlink ``data -> …/actmerge/recipes/data``).
A path that leaves both — absolute outside them, ``..`` climbing out, a symlink resolving outside —
is refused, used by this run or not: baked checkpoints ship the recipe's files, and a recipe
downloaded from elsewhere must not be able to name ``~/.ssh/id_rsa``. A path that names a directory, a FIFO or a device is refused for what it is."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from .errors import RecipeError
from .io.files import not_regular, read_regular


def read_text(path: Path, what: str) -> str:
    """A text file as UTF-8, with a clear error naming the file (and the byte offset) otherwise: a
    missing file, one that is not a regular file (never read: a FIFO would block), a binary or a
    non-UTF-8 one."""
    try:
        raw = read_regular(path)
    except FileNotFoundError:
        raise RecipeError(f"{what} {path} does not exist: check the path.") from None
    except ValueError as exc:
        raise RecipeError(f"{what} {path} {exc}: give a UTF-8 text file.") from None
    except OSError as exc:
        raise RecipeError(f"{what} {path} cannot be read ({exc.strerror or exc}): check the path.") from None
    if b"\x00" in raw[:8192]:
        raise RecipeError(f"{what} {path} is a binary file, not text: give a UTF-8 text file.")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            f"{what} {path} is not UTF-8 (byte {exc.start}: {raw[exc.start : exc.start + 1]!r}): "
            "re-save it as UTF-8."
        ) from None


def load_yaml(path: Path, what: str = "recipe"):
    """The parsed YAML of ``path`` (any type: the caller checks the shape), or a one-line RecipeError
    for a file that is missing, not text, not YAML, or nested too deeply to parse."""
    text = read_text(path, what)
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        why = " ".join(str(exc.problem or exc.context or "syntax error").split())
        raise RecipeError(f"{what} {path} is not valid YAML: {why}{where}. Fix the file.") from None
    except yaml.YAMLError as exc:
        why = " ".join(str(exc).split())
        raise RecipeError(f"{what} {path} is not valid YAML: {why}. Fix the file.") from None
    except RecursionError:
        raise RecipeError(
            f"{what} {path} is nested too deeply to read (hundreds of levels): a recipe is a flat mapping "
            "(name:, method:, sites:, source:, target: …)."
        ) from None


def load_mapping(path: Path, what: str = "recipe") -> dict:
    """``load_yaml`` of a file that must hold a mapping (a recipe)."""
    data = load_yaml(path, what)
    if not isinstance(data, dict):
        got = "empty" if data is None else f"a YAML {type(data).__name__}"
        raise RecipeError(
            f"{what} {path} is {got}, not a mapping: a recipe is a YAML mapping "
            "(name:, method:, sites:, source:, target: …)."
        )
    return data


def check_data_paths(
    recipe_file: Path, base_dir: Path, paths: dict[str, Path], also: tuple[Path, ...] = ()
) -> None:
    """Refuse a data path (``paths``: field → path as written) that leaves ``base_dir`` (the recipe's
    resolved directory) and every directory of ``also`` (the built-in recipes'), or names something
    other than a regular file. Missing files pass here (a file this run does not read may be absent);
    the reader of a used one says so."""
    for field, value in paths.items():
        target = value if value.is_absolute() else base_dir / value
        why = not_regular(target)  # first: /dev/zero is a device before it is outside the directory
        if why is not None and not why.startswith("does not exist"):
            raise RecipeError(f"{recipe_file}: {field}: {value} {why}: give a text file.")
        try:
            real = target.resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop
            raise RecipeError(f"{recipe_file}: {field}: {value} cannot be resolved ({exc}).") from None
        if not any(real.is_relative_to(root) for root in (base_dir, *also)):
            via = f" (it resolves to {real})" if real != target.absolute() else ""
            raise RecipeError(
                f"{recipe_file}: {field}: {value} is outside the recipe's directory {base_dir}{via}: a "
                "recipe's data files must live beside it (they are shipped with baked checkpoints). "
                "Copy the file into that directory and name it relative to the recipe."
            )


def read_sentences(path: Path, text_field: str = "text") -> list[str]:
    """Sentences from a txt file (one per line; blank lines and '#' comments skipped) or jsonl."""
    why = not_regular(path)
    if why == "does not exist":
        raise RecipeError(
            f"sentence file {path} does not exist (paths in a recipe are relative to the recipe)."
        )
    lines = read_text(path, "sentence file").splitlines()
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise RecipeError(f"{path}:{i}: not valid JSON ({exc}).") from None
            text = row.get(text_field) if isinstance(row, dict) else row
            if not isinstance(text, str):
                raise RecipeError(
                    f"{path}:{i}: no string field {text_field!r} (set `text_field:` in the recipe)."
                )
            out.append(text.strip())
    else:
        out = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not out:
        raise RecipeError(f"sentence file {path} is empty.")
    return out


def check_sentence_counts(source: int, target: int, minimum: int, log) -> int:
    """Refuse fewer than ``minimum`` sentences on a side; warn when one side is over 4× the other
    (the estimators pair samples, so the larger side is subsampled). Returns the count used per side."""
    for side, n in (("source", source), ("target", target)):
        if n < minimum:
            raise RecipeError(
                f"the recipe's {side} file has {n} sentences; at least {minimum} are needed for a stable fit "
                "(add sentences, or lower `min_sentences:` in the recipe if you know what you are doing)."
            )
    used = min(source, target)
    if max(source, target) > 4 * used:
        log(
            f"warning: {source} source vs {target} target sentences: the fit pairs samples, so only {used} of "
            "each side are used. Balance the two files for a better fit."
        )
    return used
