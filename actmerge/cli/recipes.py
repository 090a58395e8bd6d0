"""`actmerge recipes`: list, show and copy the recipes shipped inside the package. Registered on
the one ``cli.app`` as a sub-app; the library side is ``recipes_catalog``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .app import app
from .options import handled

recipes_app = typer.Typer(
    help="The built-in recipes: list them (no arguments), show one, or copy one to edit it. "
    "`--recipe NAME` uses a built-in when no file of that name exists in the working directory.",
    invoke_without_command=True,
    no_args_is_help=False,
)
out = Console()


@recipes_app.callback()
@handled
def recipes_list(ctx: typer.Context):
    """List the built-in recipes: what each steers, its method, sites, the model families that have
    those sites, and its default strength."""
    if ctx.invoked_subcommand is not None:
        return
    from ..recipes_catalog import catalog
    from ..sites import ARCHITECTURES

    every_llm = {t for a in ARCHITECTURES for t in a.model_types}
    table = Table(title="built-in recipes (`--recipe NAME`)", title_justify="left", show_lines=True)
    table.add_column("recipe", ratio=5, overflow="fold")
    table.add_column("method", no_wrap=True)
    table.add_column("λ", justify="right", no_wrap=True)
    table.add_column("sites: layers · models", ratio=4, overflow="fold")
    for e in catalog():
        if e.diffusion:
            families = "diffusion: " + (", ".join(e.families) or "-")
        else:
            families = "every LLM" if set(e.families) == every_llm else ", ".join(e.families) or "-"
        table.add_row(
            f"[bold]{e.name}[/]\n[dim]{_first_sentence(e.description)}[/]",
            e.method,
            str(e.strength),
            "\n".join(e.sites) + f"\n[dim]{families}[/]",
        )
    out.print(table)
    out.print(
        "`actmerge recipes show NAME` prints one; `actmerge recipes copy NAME DIR` writes an editable copy."
    )


def _first_sentence(text: str) -> str:
    head, dot, _ = text.partition(". ")
    return head + ("." if dot else "")


@recipes_app.command("show")
@handled
def show(
    name: Annotated[str, typer.Argument(help="Built-in recipe name (detox, detox.yaml) or a recipe file.")],
):
    """Print a recipe's YAML and the files it reads."""
    from ..recipe_files import read_text
    from ..recipes_catalog import describe, find_recipe

    path = find_recipe(name)
    entry = describe(path)
    typer.echo(f"# {path}")
    typer.echo(read_text(path, "recipe").rstrip())  # verbatim: comments included, no re-wrapping
    typer.echo(
        f"# method {entry.method}, default strength {entry.strength}; its sites exist in: "
        f"{', '.join(entry.families) or '-'}"
    )


@recipes_app.command("copy")
@handled
def copy(
    name: Annotated[str, typer.Argument(help="Built-in recipe name (`actmerge recipes` lists them).")],
    dest: Annotated[
        Path, typer.Argument(help="Directory to write the recipe and its sentence files into.")
    ] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing files.")] = False,
):
    """Write an editable copy of a built-in recipe with its sentence files (same relative layout)."""
    from ..recipes_catalog import copy as copy_recipe

    written = copy_recipe(name, dest, force=force)
    for p in written:
        out.print(f"wrote {p}", highlight=False)
    out.print(f"edit it, then: actmerge bake MODEL --recipe {written[0]} -o out/", highlight=False)


app.add_typer(recipes_app, name="recipes")
