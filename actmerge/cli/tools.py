"""The file-to-file commands: export-gguf, export-control-vector, compose. Registered on the one
``cli.app``; thin over ``gguf_export``, ``control_vector`` and ``baking``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import ActmergeError
from .app import app
from .options import AllowExtrapolation, Force, handled, log
from .render import out


@app.command("export-gguf")
@handled
def export_gguf(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory (e.g. from `actmerge bake`).")],
    output: Annotated[Path, typer.Option("-o", "--out", help="GGUF file to write.")],
    outtype: Annotated[
        str, typer.Option(help="f32, f16, bf16, q8_0, or a llama.cpp quantisation (q4_k_m, q5_k_m, q6_k…).")
    ] = "f32",
    force: Force = False,
):
    """Convert a checkpoint to GGUF with llama.cpp's own converter (from the pinned llama-cpp-python
    sdist, or $ACTMERGE_LLAMA_CPP). All-zero biases llama.cpp does not load are left out."""
    from ..gguf_export import export_gguf as run

    res = run(checkpoint, output, outtype=outtype, force=force, log=log)
    out.print(f"[green]wrote[/] {res.out} ({res.outtype}, {res.seconds:.1f}s)")


@app.command("export-control-vector")
@handled
def export_control_vector(
    maps: Annotated[
        Path, typer.Argument(help="Maps file (a checkpoint's actmerge/maps.safetensors: as baked).")
    ],
    output: Annotated[Path, typer.Option("-o", "--out", help="Control-vector GGUF to write.")],
    model: Annotated[
        str | None, typer.Option("--model", help="Model of the maps (default: their base_model).")
    ] = None,
    strength: Annotated[float, typer.Option("--strength", "-s", help="λ: the vector holds λ·β.")] = 1.0,
    partial: Annotated[
        bool, typer.Option("--partial", help="Export what can be a vector; report the rest.")
    ] = False,
    allow_extrapolation: AllowExtrapolation = False,
    force: Force = False,
):
    """The shifts of maps at layer-end sites (Gemma mlp_post, Llama-like mlp_out) as a llama.cpp control
    vector; bake the same maps with --shift-policy drop and run `llama-cli --control-vector cv.gguf`."""
    from ..control_vector import control_vector, write_control_vector
    from ..fitting import preflight_maps
    from ..io.output import check_output
    from ..maps import MapSet
    from ..models import resolve
    from ..sites import architecture_for, num_layers
    from ..strength import one

    strength = one(strength, allow_extrapolation=allow_extrapolation)  # before any file is read
    check_output(output, maps, force=force, is_dir=False)
    mapset = MapSet.load(maps)
    name = model or mapset.base_model
    if not name:
        raise ActmergeError("the maps file names no base model: pass --model MODEL.")
    source = resolve(name, log=log)
    check_output(output, [maps, source.path], force=force, is_dir=False)
    config = source.config
    preflight_maps(mapset, source, log)
    cv = control_vector(mapset, config, strength, partial=partial, allow_extrapolation=allow_extrapolation)
    n = num_layers(architecture_for(config), config)
    write_control_vector(
        cv,
        output,
        model_hint=config.get("model_type", ""),
        n_layers=n,
        force=force,
        source=[maps, source.path],
    )
    layers = ", ".join(map(str, sorted(cv.directions)))
    out.print(f"[green]wrote[/] {output}: {len(cv.directions)} directions (layers {layers})")
    if cv.elsewhere:
        out.print(f"{len(cv.elsewhere)} map(s) with shifts elsewhere are not in the vector (bake them)")


@app.command()
@handled
def compose(
    maps: Annotated[list[Path], typer.Argument(help="Maps files, applied in this order.")],
    output: Annotated[Path, typer.Option("-o", "--out", help="Composed maps file to write.")],
    strength: Annotated[str, typer.Option("--strength", "-s", help="One λ per maps file, e.g. 1.0,0.5.")],
    allow_extrapolation: AllowExtrapolation = False,
    force: Force = False,
):
    """Compose maps files (each at its own strength) into one maps file, to bake at strength 1."""
    from ..baking import compose_all
    from ..io.output import check_output
    from ..maps import MapSet
    from ..strength import parse

    lams = parse(strength)  # one λ per file, repeats kept: compose_all checks them
    check_output(output, maps, force=force, is_dir=False)
    composed = compose_all(
        [MapSet.load(p) for p in maps], lams, allow_extrapolation=allow_extrapolation, warn=log
    )
    composed.save(output, force=force, source=maps)
    out.print(f"wrote {len(composed)} composed maps to {output}; bake it with --strength 1")
