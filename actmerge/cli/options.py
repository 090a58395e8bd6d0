"""What every CLI command shares: option types, placement and strength parsing, and the error,
interrupt and signal handling that turns library errors into one-line messages and exit codes."""

from __future__ import annotations

import functools
import os
import signal
from pathlib import Path
from typing import Annotated

import typer

from ..errors import ActmergeError, PlacementError
from .render import err

Model = Annotated[
    str,
    typer.Argument(
        help="Hub id or short name, local HF directory, .gguf file, diffusers pipeline, or a built-in: gemma-3-270m, smollm2-135m."
    ),
]


def _recipe_arg(value):
    """--recipe: a YAML file, or a built-in recipe's name (``detox``, ``detox.yaml``); a file wins."""
    from ..recipes_catalog import find_recipe

    if not value:
        return value
    try:
        found = [find_recipe(v, log=log).resolve() for v in (value if isinstance(value, list) else [value])]
    except ActmergeError as exc:
        raise typer.BadParameter(str(exc)) from None
    return found if isinstance(value, list) else found[0]


_RECIPE_HELP = "Recipe YAML, or a built-in recipe's name (`actmerge recipes`; a local file wins)."
Recipe = Annotated[str, typer.Option("--recipe", "-r", help=_RECIPE_HELP, callback=_recipe_arg)]
RecipeOpt = Annotated[str | None, typer.Option("--recipe", "-r", help=_RECIPE_HELP, callback=_recipe_arg)]
Recipes = Annotated[
    list[str] | None,
    typer.Option(
        "--recipe", "-r", help=_RECIPE_HELP + " Repeat to compose: one --strength each.", callback=_recipe_arg
    ),
]
MapsOpt = Annotated[Path | None, typer.Option("--maps", "-m", help="Maps file from `actmerge fit`.")]
Revision = Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit) of MODEL.")]
Device = Annotated[
    str | None,
    typer.Option(help="Torch device, e.g. cpu, cuda, cuda:1 (default: cuda when present, else cpu)."),
]
DeviceMap = Annotated[
    str | None,
    typer.Option("--device-map", help="Spread a model larger than memory: auto, balanced, sequential …"),
]
MaxMemory = Annotated[
    str | None,
    typer.Option(
        "--max-memory", help="Budget per device, e.g. cpu=2GiB or 0=20GiB,cpu=30GiB (rest on disk)."
    ),
]
OffloadFolder = Annotated[
    Path | None, typer.Option("--offload-folder", help="Directory for offloaded weights.")
]
Force = Annotated[
    bool,
    typer.Option(
        "--force", help="Replace an existing output (only one actmerge wrote; see docs/guarantees.md)."
    ),
]
AllowExtrapolation = Annotated[
    bool,
    typer.Option("--allow-extrapolation", help="Allow strengths above 4 (far beyond the fitted transport)."),
]


class _Signal(BaseException):
    """SIGTERM / SIGHUP, raised in the main thread so that every clean-up runs as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_signal(signum, _frame):
    raise _Signal(signum)


def handled(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = {s: signal.signal(s, _raise_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
        try:
            _one_process_unless_launched(fn)
            return fn(*args, **kwargs)
        except ActmergeError as exc:
            if os.environ.get("ACTMERGE_DEBUG"):
                raise
            err.print(f"[bold red]error:[/] {exc}{_written(exc)}", highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except (KeyboardInterrupt, _Signal) as exc:
            code = 128 + exc.signum if isinstance(exc, _Signal) else 130
            what = "terminated" if isinstance(exc, _Signal) else "interrupted"
            written = _written(exc)
            done = (
                "; partial output was removed" + written
                if written
                else ": nothing was written (partial output is removed)"
            )
            err.print(f"[red]{what}[/]{done}.", highlight=False)
            raise typer.Exit(code) from None
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    return wrapper


def _one_process_unless_launched(fn) -> None:
    from ..distributed import launched as under_launcher

    if under_launcher() and not getattr(fn, "actmerge_launched", False):
        raise PlacementError(
            f"`actmerge {fn.__name__.strip('_').replace('_', '-')}` runs in one process: run it without torchrun / "
            "accelerate launch (only fit and bake split their work over processes)."
        )


def launched(fn):
    """fit / bake under torchrun or accelerate launch: one process group for the command, every
    process failing together (``distributed.session``); nothing at all in a single process."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .. import distributed

        with distributed.session(kwargs.get("device")):
            return fn(*args, **kwargs)

    wrapper.actmerge_launched = True
    return wrapper


def _written(exc: BaseException) -> str:
    done = getattr(exc, "actmerge_written", [])
    return f" (already complete and kept: {', '.join(done)})" if done else ""


def log(msg: str) -> None:
    from ..distributed import is_main

    if is_main():  # under a launcher, one process speaks
        err.print(msg, highlight=False, markup=False)  # plain text: "[actmerge] …" is not a style tag


def placement_of(device=None, device_map=None, max_memory=None, offload_folder=None):
    from ..placement import Placement

    try:
        return Placement(device, device_map, max_memory, offload_folder)
    except PlacementError as exc:
        raise typer.BadParameter(str(exc)) from None


MaxPplRatio = Annotated[
    float | None,
    typer.Option(
        "--max-ppl-ratio", help="Tuning budget: perplexity ratio to the base on tuning text (default 1.10)."
    ),
]
MaxKl = Annotated[
    float | None,
    typer.Option("--max-kl", help="Tuning budget: mean per-token KL(base ‖ steered) in nats on tuning text."),
]


Confidence = Annotated[
    float | None,
    typer.Option(
        "--confidence",
        help="Tuning budget: judged on the upper end of this bootstrap interval over the tuning texts "
        "(default 0.95; 0: on the point estimate).",
    ),
]


def budget_of(max_ppl_ratio: float | None, max_kl: float | None, confidence: float | None = None):
    """The tuning budget of --max-ppl-ratio/--max-kl/--confidence (checked: finite, > 1 / > 0, a level
    in [0, 0.99]); neither budget: ×1.10; no confidence: 0.95."""
    from ..evaluation.budget import DEFAULT_CONFIDENCE, Budget

    conf = DEFAULT_CONFIDENCE if confidence is None else confidence
    if max_ppl_ratio is None and max_kl is None:
        return Budget(confidence=conf)
    return Budget(max_ppl_ratio, max_kl, conf)
