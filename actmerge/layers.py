"""Layer selections of a recipe: "all", "2-5", "0,3,7", "-4:" (a python slice), or relative to depth
("50%-100%"), resolved against a model's number of layers, with clear errors for selections that are
reversed, empty or out of range."""

from __future__ import annotations

import math
import re

from .errors import SiteError


def _depth(pct: str, n: int) -> int:
    """``pct`` % of ``n`` layers, rounded half up (so "50%" of 18 is 9 and of 30 is 15)."""
    value = float(pct)
    if not 0 <= value <= 100:
        raise SiteError(f"layer fraction {pct}% is outside 0-100%.")
    return math.floor(value * n / 100 + 0.5)


def parse_layers(spec: str | list[int] | None, n: int) -> list[int]:
    """``None``/"all" → every layer; "2-5", "0,3,7", "-4:" (python slice) or a list of ints.

    Relative to depth: "50%-100%" selects layers ``i`` with ``round(0.5·n) ≤ i < round(1.0·n)``
    (the second half of the stack at any depth); "0%-25%" the first quarter. A relative range that
    would be empty on a shallow model selects the one layer at its start."""
    if spec is None or spec == "all":
        return list(range(n))
    if isinstance(spec, list):
        layers = [int(x) for x in spec]
    else:
        text = str(spec).replace(" ", "")
        layers = []
        for part in text.split(","):
            if m := re.fullmatch(r"(\d+(?:\.\d+)?)%-(\d+(?:\.\d+)?)%", part):
                a, b = _depth(m[1], n), _depth(m[2], n)
                if a > b:
                    raise SiteError(f"layer range {part!r} runs backwards: give 'low%-high%'.")
                layers.extend(range(a, b) if b > a else [min(a, n - 1)])
            elif "%" in part:
                raise SiteError(
                    f"cannot read layer fraction {part!r}: write a range of depth such as '50%-100%'."
                )
            elif m := re.fullmatch(r"(-?\d*):(-?\d*)", part):  # python slice, e.g. "-4:" = the last four
                ends = [int(x) if x else None for x in (m[1], m[2])]
                if any(e is not None and not -n <= e <= n for e in ends):
                    raise SiteError(
                        f"layer slice {part!r} reaches beyond the model's {n} layers (-{n}..{n})."
                    )
                picked = range(n)[slice(*ends)]
                if not picked:
                    raise SiteError(f"layer slice {part!r} selects no layer of {n}: check its order.")
                layers.extend(picked)
            elif m := re.fullmatch(r"(\d+)-(\d+)", part):  # inclusive range "2-5"
                if int(m[1]) > int(m[2]):
                    raise SiteError(f"layer range {part!r} is reversed: write it low-high, e.g. '2-5'.")
                layers.extend(range(int(m[1]), int(m[2]) + 1))
            elif re.fullmatch(r"-?\d+", part):
                if int(part) < -n:
                    raise SiteError(
                        f"layer {part} is out of range: the model has {n} layers (-{n}..{n - 1})."
                    )
                layers.append(int(part) + n if int(part) < 0 else int(part))
            else:
                raise SiteError(
                    f"cannot read layer selection {spec!r}: use 'all', '2-5', '0,3,7', '-4:' or '50%-100%'."
                )
    if not layers:
        raise SiteError(f"layer selection {spec!r} selects no layer.")
    bad = [x for x in layers if not 0 <= x < n]
    if bad:
        raise SiteError(f"layer(s) {bad} out of range: the model has {n} layers (0..{n - 1}).")
    return sorted(set(layers))
