"""The one Typer app and its top-level callback (--version). The verb modules (``model``, ``eval``,
``tools``, ``tune``, ``recipes``) register their commands on it; ``cli/__init__.py`` imports them."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import __version__
from .render import out

app = typer.Typer(
    help="Bake activation steering (Linear-AcT, Mean-AcT or LinEAS maps) into model weights: fit maps on "
    "two prompt sets, fold them at a fixed strength into norms, weights and biases, and write a "
    "standalone checkpoint that plain transformers / vLLM / llama.cpp (or diffusers) load. Built-in "
    "models: gemma-3-270m, smollm2-135m.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool):
    if value:
        out.print(f"actmerge {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
):
    """Bake activation steering into model weights."""
