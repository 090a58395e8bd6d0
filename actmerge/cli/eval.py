"""`actmerge eval`: what steering does and costs, on identical prompts. Registered on the one
``cli.app``; thin over ``pipeline.evaluate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import app
from .options import (
    AllowExtrapolation,
    Device,
    DeviceMap,
    Force,
    MapsOpt,
    MaxMemory,
    Model,
    OffloadFolder,
    RecipeOpt,
    Revision,
    handled,
    log,
    placement_of,
)
from .render import out


@app.command("eval")
@handled
def eval_(
    model: Model,
    output: Annotated[Path, typer.Option("-o", "--out", help="Report directory (report.json, sweep.png).")],
    recipe: RecipeOpt = None,
    maps: MapsOpt = None,
    strengths: Annotated[
        str, typer.Option(help="Hooked strengths to preview (empty: none).")
    ] = "0,0.25,0.5,0.75,1",
    baked: Annotated[
        list[Path] | None, typer.Option("--baked", help="Baked directory to evaluate (repeatable).")
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option(help="Prompts file (default: the recipe's eval_prompts).")
    ] = None,
    neutral: Annotated[
        Path | None, typer.Option(help="Neutral text for perplexity (default: the recipe's).")
    ] = None,
    metrics: Annotated[
        str | None, typer.Option(help="toxicity, concept, perplexity, similarity (comma list).")
    ] = None,
    scorer: Annotated[
        str | None, typer.Option(help="Toxicity scorer: profanity (offline) or hf:<model id>.")
    ] = None,
    keywords: Annotated[Path | None, typer.Option(help="Concept keywords file (one per line).")] = None,
    sample: Annotated[bool, typer.Option("--sample", help="The paper's sampling instead of greedy.")] = False,
    max_new_tokens: Annotated[int | None, typer.Option(help="New tokens per continuation.")] = None,
    limit: Annotated[int | None, typer.Option(help="Use only the first N prompts.")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed (default: the recipe's).")] = None,
    lm_eval: Annotated[
        str | None,
        typer.Option(
            "--lm-eval", help="lm-evaluation-harness tasks (e.g. mmlu) on the base and each --baked dir."
        ),
    ] = None,
    lm_eval_include: Annotated[
        Path | None, typer.Option("--lm-eval-include", help="Directory of local lm-eval task YAMLs.")
    ] = None,
    lm_eval_limit: Annotated[
        int | None, typer.Option("--lm-eval-limit", help="lm-eval: only the first N documents per task.")
    ] = None,
    chat: Annotated[
        bool,
        typer.Option(
            "--chat",
            help="Send each prompt as a user turn of the model's chat template and score the assistant's "
            "reply (instruct models; a recipe with `chat: true` does this where the model has a template).",
        ),
    ] = False,
    clamped: Annotated[
        bool, typer.Option(help="Linear-AcT: rows for ml-act's clamped (not bakeable) variant.")
    ] = True,
    revision: Revision = None,
    device: Device = None,
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
    allow_extrapolation: AllowExtrapolation = False,
    force: Force = False,
):
    """Measure what steering does: base, hooked previews at several strengths and baked checkpoints on
    identical prompts — a table, report.json and sweep.png (each metric vs λ)."""
    from .. import pipeline
    from ..recipe import read_sentences
    from ..strength import parse
    from .render import eval_report

    options = pipeline.EvalOptions(  # every eval flag, mapped onto its field here
        strengths=parse(strengths, what="--strengths") or [],
        baked=baked or [],
        out=output,
        force=force,
        clamped=clamped,
        revision=revision,
        placement=placement_of(device, device_map, max_memory, offload_folder),
        settings=pipeline.EvalOverrides(  # after --strengths and the placement, as the flags are checked
            prompts=read_sentences(prompts) if prompts else None,
            neutral=read_sentences(neutral) if neutral else None,
            metrics=[m.strip() for m in metrics.split(",")] if metrics else None,
            scorer=scorer,
            keywords=read_sentences(keywords) if keywords else None,
            max_new_tokens=max_new_tokens,
            sample=sample,
            seed=seed,
            limit=limit,
            chat=chat,
        ),
        allow_extrapolation=allow_extrapolation,
        lm_eval=[t.strip() for t in lm_eval.split(",") if t.strip()] if lm_eval else [],
        lm_eval_include=lm_eval_include,
        lm_eval_limit=lm_eval_limit,
    )
    report = pipeline.evaluate(model, recipe=recipe, maps=maps, options=options, log=log)
    eval_report(report)
    out.print(f"wrote {output / 'report.json'} and {output / 'sweep.png'}")
