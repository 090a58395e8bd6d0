"""`actmerge tune`: the strongest steering within a cost budget on the recipe's tuning split.
Registered on the one ``cli.app``; thin over ``evaluation.tune.tune``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import app
from .options import (
    AllowExtrapolation,
    Confidence,
    Device,
    Force,
    MapsOpt,
    MaxKl,
    MaxPplRatio,
    Model,
    Recipe,
    budget_of,
    handled,
    log,
    placement_of,
)


@app.command()
@handled
def tune(
    model: Model,
    recipe: Recipe,
    output: Annotated[
        Path, typer.Option("-o", "--out", help="Report directory (tune.json, tune.png).")
    ] = Path("tune"),
    max_ppl_ratio: MaxPplRatio = None,
    max_kl: MaxKl = None,
    confidence: Confidence = None,
    maps: MapsOpt = None,
    max_strength: Annotated[
        float, typer.Option(help="Largest λ tried (≤ 4 unless --allow-extrapolation).")
    ] = 2.0,
    step: Annotated[float, typer.Option(help="Coarse grid step in λ (at most 64 grid points).")] = 0.25,
    tol: Annotated[float, typer.Option(help="Bisection tolerance in λ (at most 20 bisection steps).")] = 0.02,
    curve: Annotated[
        bool, typer.Option(help="Measure the behaviour at every grid point (--no-curve: only at the choice).")
    ] = True,
    allow_extrapolation: AllowExtrapolation = False,
    device: Device = None,
    force: Force = False,
):
    """Find the strongest steering within a cost budget on the recipe's tuning split (never its eval
    prompts): fit once, hooked previews on a λ grid, then bisection. Bake it with --strength auto."""
    from .. import pipeline
    from ..evaluation.tune import check_search
    from ..evaluation.tune import tune as run_tune
    from ..options import TuneOptions
    from .render import tune_result

    # every option checked before the model is resolved (a built-in may be converted first)
    check_search(max_strength, step, tol, allow_extrapolation=allow_extrapolation)
    options = TuneOptions(
        budget=budget_of(max_ppl_ratio, max_kl, confidence),
        max_strength=max_strength,
        step=step,
        tol=tol,
        allow_extrapolation=allow_extrapolation,
        curve=curve,
        out=output,
        force=force,
    )
    res = run_tune(
        pipeline.load(model, placement=placement_of(device), log=log),
        recipe,
        maps=maps,
        options=options,
        log=log,
    )
    tune_result(res, model, recipe, output, maps)
    if not res.met:
        raise typer.Exit(6)
