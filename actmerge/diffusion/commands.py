"""The pipeline side of the CLI verbs (``actmerge bake|verify|sites`` on a directory with
model_index.json): argument checks and rich output. cli.py dispatches here and turns errors and
the returned verdicts into exit codes."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..errors import RecipeError


def bake(
    out: Console,
    model: str,
    *,
    recipes: list[Path],
    maps: Path | None,
    strengths: list[float] | None,
    output: Path | None,
    shift_policy: str,
    dry_run: bool,
    force: bool,
    revision: str | None,
    device: str | None,
    verify: bool,
    unsupported: dict[str, bool],
    log,
) -> bool:
    """Bake (and optionally verify) a pipeline; False when a verification failed."""
    from .bake import bake_pipeline
    from .verify import verify_pipeline

    given = [name for name, used in unsupported.items() if used]
    if given:
        raise RecipeError(f"{', '.join(given)} do(es) not apply to diffusers pipelines: drop it.")
    if len(recipes) > 1:
        raise RecipeError("pipelines take one --recipe (compose maps files with `actmerge compose`).")
    results = bake_pipeline(
        model,
        recipe=recipes[0] if recipes else None,
        maps=maps,
        strengths=strengths,
        out=output,
        shift_policy="drop" if shift_policy == "drop" else None,  # else: the recipe's policy
        force=force,
        dry_run=dry_run,
        revision=revision,
        device=device,
        log=log,
    )
    ok = True
    for res in results:
        rows = [r for r in res.plan.rows() if r["class"] != "identity"]
        table = Table(
            title=f"pipeline fold plan at λ = {res.strength:g} ({len(rows)} of {len(res.plan.sites)} maps active)"
        )
        for col in ("site", "class", "scale →", "shift →", "note"):
            table.add_column(col, overflow="fold")
        shown = rows if len(rows) <= 40 else rows[:20] + rows[-20:]
        for r in shown:
            table.add_row(*(r[c] for c in ("site", "class", "scale →", "shift →", "note")))
        out.print(table)
        for note in res.notes:
            out.print(f"[yellow]note:[/] {note}")
        if res.out:
            out.print(f"[green]wrote[/] {res.out} (bake {res.seconds:.1f}s)")
            if verify:
                rep = verify_pipeline(res.out, device=device)
                print_verify(out, rep)
                ok = ok and rep.passed
    return ok


def verify(
    out: Console,
    checkpoint: Path,
    *,
    base: str | None,
    maps: Path | None,
    strength: float | None,
    tolerance: float | None,
    as_json: bool,
    device: str | None,
) -> bool:
    from .verify import verify_pipeline

    rep = verify_pipeline(
        checkpoint, base=base, maps=maps, strength=strength, tolerance=tolerance, device=device
    )
    if as_json:
        print(rep.to_json())
    else:
        print_verify(out, rep)
    return rep.passed


def print_verify(out: Console, rep) -> None:
    table = Table(
        title=f"hooked base vs baked pipeline in plain diffusers ({rep.n_prompts} prompts, {rep.steps} steps)"
    )
    for col in ("output", "tensors", "max |Δ|", "max |ref|", "max relative"):
        table.add_column(col, justify="right")
    for name, g in rep.groups.items():
        table.add_row(name, str(g.n_tensors), f"{g.max_abs:.3g}", f"{g.max_ref:.3g}", f"{g.max_rel:.3g}")
    out.print(table)
    if rep.moved_shifts:
        out.print(f"{len(rep.moved_shifts)} text-encoder shift(s) live in the denoiser: compared end to end")
    status = "[green]PASS[/]" if rep.passed else "[red]FAIL[/]"
    out.print(f"{status} max relative error {rep.max_rel:.3g} (tolerance {rep.tolerance:g})")


def sites(out: Console, model: str, revision: str | None) -> None:
    from .plan import capabilities
    from .source import resolve_pipeline

    source = resolve_pipeline(model, revision)
    table = Table(title=f"{model}: {source.pipeline_class}", title_justify="left")
    cols = ("component", "site", "module", "side", "blocks", "shift", "about")
    for col in cols:
        table.add_column(col, overflow="fold")
    for r in capabilities(source):
        table.add_row(*(r[c] for c in cols))
    out.print(table)
    out.print("Scales fold exactly at every listed site; recipes name sites as `site` or `component/site`.")
