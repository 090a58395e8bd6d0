"""The recipes shipped inside the package (``actmerge/recipes/``) and the one resolver of a
``--recipe`` argument.

Lookup order for ``find_recipe(spec)``: an existing file at ``spec`` (relative to the working
directory) always wins — and for a bare name without a suffix, ``spec.yaml`` there too; otherwise a
bare name (``detox`` or ``detox.yaml``, no directory part) is the built-in recipe of that name;
otherwise an error that lists the built-ins. The log says when a built-in was used, and when a
local file shadows a built-in of the same name.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import RecipeError
from .io.files import not_regular
from .recipe_files import load_mapping

BUILTIN_DIR = Path(__file__).resolve().parent / "recipes"
SUFFIXES = (".yaml", ".yml")


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def builtin_path(name: str) -> Path | None:
    """The built-in recipe ``name`` (``detox`` or ``detox.yaml``), or None."""
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix in SUFFIXES else name
    path = BUILTIN_DIR / f"{stem}.yaml"
    return path if "/" not in name and "\\" not in name and path.is_file() else None


def find_recipe(spec: str | Path, *, log=None) -> Path:
    """A ``--recipe`` argument → the recipe file to load (see the module docstring for the order)."""
    text = str(spec)
    path = Path(text).expanduser()
    builtin = builtin_path(text)
    local = path if path.is_file() else None
    if local is None and not path.suffix and builtin is not None and path.with_suffix(".yaml").is_file():
        local = path.with_suffix(".yaml")
    if local is not None:
        if builtin is not None and log is not None and local.resolve() != builtin:
            log(f"[actmerge] recipe {text}: the local file {local} (not the built-in {builtin.stem})")
        return local
    if builtin is not None:
        if log is not None:
            log(f"[actmerge] recipe {text}: the built-in {builtin.stem} ({builtin})")
        return builtin
    why = not_regular(path)
    if why is not None and not why.startswith("does not exist"):
        raise RecipeError(f"recipe {text} {why}: give a recipe YAML file or a built-in recipe name.")
    raise RecipeError(
        f"recipe {text} does not exist: no such file, and no built-in recipe of that name. "
        f"Built-in recipes: {', '.join(builtin_names())} (`actmerge recipes` describes them; "
        "`actmerge recipes copy NAME DIR` writes an editable copy)."
    )


@dataclass(frozen=True)
class Entry:
    """One built-in recipe, as `actmerge recipes` lists it."""

    name: str
    path: Path
    description: str
    method: str
    sites: list[str]  # "attn_post 9-17", …
    families: list[str]  # architectures (LLM) or components (diffusion) that have every named site
    strength: float | str  # per family: the range, e.g. "0.5–1"
    diffusion: bool


def catalog() -> list[Entry]:
    return [describe(BUILTIN_DIR / f"{n}.yaml") for n in builtin_names()]


def _site_lines(specs) -> tuple[list[str], list[str]]:
    """("site, site: layers" lines, site names) of one list of site specs (entries of another shape
    are left out: `recipes show` describes any mapping, validation is the bake's job)."""
    lines, names = [], []
    for spec in specs if isinstance(specs, list) else []:
        site = spec if isinstance(spec, str) else spec.get("site") if isinstance(spec, dict) else None
        group = [site] if isinstance(site, str) else [str(s) for s in site] if isinstance(site, list) else []
        if not group:
            continue
        layers = "all" if isinstance(spec, str) else str(spec.get("layers", "all"))
        names += group
        lines.append(f"{', '.join(group)}: {layers}")
    return lines, names


def _number(value) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def describe(path: Path) -> Entry:
    """A recipe file's summary; a RecipeError (one line) when it is not a readable YAML mapping."""
    data = load_mapping(path)
    raw = data.get("sites", [])
    diffusion = "diffusion" in data
    if isinstance(raw, dict):  # a portable recipe: sites per architecture row, `default` for the rest
        sites, families = [], []
        for family, specs in raw.items():
            lines, _ = _site_lines(specs)
            sites += [f"{family} → {line}" for line in lines]
            families.append("every other family" if family == "default" else str(family))
    else:
        sites, names = _site_lines(raw)
        families = _diffusion_families(names) if diffusion else _llm_families(names)
    modules = data.get("modules", [])
    sites += [str(m) for m in modules] if isinstance(modules, list) else []
    strength = data.get("strength", 1.0)
    if isinstance(strength, dict):  # per family: the range (`recipes show` has all)
        values = sorted(v for v in map(_number, strength.values()) if v is not None) or [1.0]
        strength = f"{values[0]:g}–{values[-1]:g}" if values[0] != values[-1] else f"{values[0]:g}"
    elif (number := _number(strength)) is not None:
        strength = number
    else:
        strength = 1.0
    return Entry(
        name=path.stem,
        path=path,
        description=" ".join(str(data.get("description", "")).split()),
        method=str(data.get("method", "linear_act")),
        sites=sites,
        families=families,
        strength=strength,
        diffusion=diffusion,
    )


def _llm_families(names: list[str]) -> list[str]:
    from .sites import ARCHITECTURES

    out = []
    for arch in ARCHITECTURES:
        if all(n in arch.sites for n in names):
            out += [t for t in arch.model_types if t not in out]
    return out


def _diffusion_families(names: list[str]) -> list[str]:
    from .kinds.diffusers.table import COMPONENTS

    bare = [n.split("/")[-1] for n in names]
    return [c.name for c in COMPONENTS if any(n in c.sites for n in bare)]


def _names_file(base: Path, value) -> bool:
    """Whether a recipe field's value is a file beside the recipe (a description longer than a file
    name can be is not: the OS refuses to even look it up)."""
    if not isinstance(value, str) or "\n" in value:
        return False
    try:
        return (base / value).is_file()
    except OSError:
        return False


def copy(name: str, dest: str | Path, *, force: bool = False) -> list[Path]:
    """Write the built-in recipe ``name`` and the files it names into ``dest`` (same relative
    layout, so its relative paths keep working). Returns the written paths, recipe first."""
    src = builtin_path(name)
    if src is None:
        raise RecipeError(f"no built-in recipe {name!r}. Built-in recipes: {', '.join(builtin_names())}.")
    dest = Path(dest)
    data = load_mapping(src)
    files = [(src, dest / src.name)]
    for key, rel in data.items():  # every field naming a file beside the recipe (source, target, …)
        if not _names_file(src.parent, rel):
            continue
        rel_path = Path(rel)
        if rel_path.is_absolute() or ".." in rel_path.parts:  # the shipped recipes never do this
            raise RecipeError(f"{src}: {key}: {rel} is outside the recipe's directory; cannot copy it.")
        files.append((src.parent / rel_path, dest / rel_path))
    existing = [d for _, d in files if d.exists()]
    if existing and not force:
        raise RecipeError(
            f"{', '.join(map(str, existing))} exist(s): choose another directory or pass --force."
        )
    for s, d in files:
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(s, d)
    return [d for _, d in files]
