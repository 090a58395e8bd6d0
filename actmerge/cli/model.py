"""`actmerge fit`, `bake`, `push`, `verify` and `sites`: the verbs on a model and its checkpoints.
Registered on the one ``cli.app``; thin over ``pipeline``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import app
from .options import (
    AllowExtrapolation,
    Confidence,
    Device,
    DeviceMap,
    Force,
    MapsOpt,
    MaxKl,
    MaxMemory,
    MaxPplRatio,
    Model,
    OffloadFolder,
    Recipe,
    Recipes,
    Revision,
    budget_of,
    handled,
    launched,
    log,
    placement_of,
)
from .render import out


@app.command()
@handled
@launched
def fit(
    model: Model,
    recipe: Recipe,
    output: Annotated[Path, typer.Option("-o", "--out", help="Maps file to write (.safetensors).")],
    revision: Revision = None,
    device: Device = None,
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
    force: Force = False,
):
    """Fit transport maps on the recipe's source/target sentences and write a maps file."""
    from .. import distributed, pipeline
    from ..io.output import check_name, check_output

    check_name(output)
    placement = placement_of(device, device_map, max_memory, offload_folder)
    target = pipeline.resolved(model, revision=revision, placement=placement, log=log)
    check_output(output, pipeline.source_path(target), force=force, is_dir=False)  # before the fit
    res = pipeline.fit(target, recipe, revision=revision, placement=placement, log=log)
    if distributed.proceed_on_main():  # under a launcher, rank 0 alone writes
        res.maps.save(output, force=force, source=pipeline.source_path(target))
        out.print(f"wrote {len(res.maps)} maps to {output}")


@app.command()
@handled
@launched
def bake(
    model: Model,
    recipe: Recipes = None,
    maps: MapsOpt = None,
    strength: Annotated[
        str | None,
        typer.Option(
            "--strength",
            "-s",
            help="λ, or several: 0.5,1.0 (a sub-directory each), or 'auto': the strength `actmerge tune` "
            "chose within --max-ppl-ratio/--max-kl (with --recipe: tuned now if none is recorded). Default: the recipe's.",
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--out", help="Output directory (must not exist).")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the fold plan and stop.")] = False,
    target: Annotated[
        list[str] | None,
        typer.Option(
            "--target",
            "-t",
            help="Runtime that must load the result: transformers, vllm, llama.cpp, gguf (exact in a quantised GGUF).",
        ),
    ] = None,
    shift_policy: Annotated[
        str | None,
        typer.Option(
            help="error: refuse shifts that cannot fold; drop: bake their scales only (default: recipe's)."
        ),
    ] = None,
    flags: Annotated[
        bool, typer.Option("--flags/--no-flags", help="Allow config flags (e.g. attention_bias) for shifts.")
    ] = True,
    verify: Annotated[bool, typer.Option("--verify", help="Verify each result in a fresh process.")] = False,
    evaluate: Annotated[
        bool,
        typer.Option("--eval", help="Evaluate base vs steered on the recipe's eval prompts (into the card)."),
    ] = False,
    push_to_hub: Annotated[
        str | None,
        typer.Option(
            "--push-to-hub", metavar="REPO_ID", help="Verify, then upload to this Hub repo (needs a token)."
        ),
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="With --push-to-hub: a private repo.")] = False,
    as_llama: Annotated[
        bool, typer.Option("--as-llama", help="Mistral: write LlamaForCausalLM so shifts fold into biases.")
    ] = False,
    allow_extrapolation: AllowExtrapolation = False,
    max_ppl_ratio: MaxPplRatio = None,
    max_kl: MaxKl = None,
    confidence: Confidence = None,
    revision: Revision = None,
    device: Device = None,
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
    force: Force = False,
):
    """Fit (--recipe) or load (--maps) maps, fold them at strength λ, and write a checkpoint.

    Several --recipe options compose: each is fitted and applied at its own strength (--strength
    1.0,0.5), maps at shared sites compose, one checkpoint is baked."""
    from .. import pipeline
    from .. import strength as strength_rules

    if shift_policy not in (None, "error", "drop"):
        raise typer.BadParameter("--shift-policy must be 'error' or 'drop'.")
    if push_to_hub and dry_run:
        raise typer.BadParameter("--push-to-hub needs a written checkpoint: drop --dry-run.")
    auto = strength_rules.is_auto(strength)
    # a budget is checked (finite, > 1 / > 0) whenever one is given, before any load
    given = max_ppl_ratio is not None or max_kl is not None or confidence is not None
    budget = budget_of(max_ppl_ratio, max_kl, confidence) if auto or given else None
    options = pipeline.BakeOptions(  # every bake flag, mapped onto its field here
        strengths=None if auto else strength_rules.parse(strength),
        out=output,
        force=force,
        dry_run=dry_run,
        targets=target or (),
        shift_policy=shift_policy,
        allow_flags=flags,
        revision=revision,
        placement=placement_of(device, device_map, max_memory, offload_folder),
        evaluate_after=evaluate,
        verify_after=verify,
        push_to_hub=push_to_hub,
        private=private,
        as_llama=as_llama,
        allow_extrapolation=allow_extrapolation,
        tune_budget=budget if auto else None,
    )
    results = pipeline.bake(model, recipe=recipe or None, maps=maps, options=options, log=log)
    from .render import bake_result

    for res in results:
        bake_result(res)
    if any(r.verification is not None and not r.verification.passed for r in results):
        raise typer.Exit(5)


@app.command()
@handled
def push(
    checkpoint: Annotated[Path, typer.Argument(help="Baked checkpoint directory (from `actmerge bake`).")],
    repo_id: Annotated[
        str | None,
        typer.Argument(
            help="Hub model repo 'user/name' (created if missing). Default: <you>/<base>-<recipe>."
        ),
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private.")] = False,
    revision: Annotated[
        str | None, typer.Option("--revision", help="Branch to upload to (created if missing).")
    ] = None,
    commit_message: Annotated[
        str | None, typer.Option("--commit-message", help="Commit message on the Hub.")
    ] = None,
    no_verify: Annotated[
        bool,
        typer.Option(
            "--no-verify",
            help="Publish without a passing, current actmerge/verify.json (regular files only, still).",
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Upload a directory that is not an actmerge output.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the files that would be uploaded.")
    ] = False,
):
    """Upload a baked checkpoint (weights, config, tokenizer, card, actmerge/ provenance) to a Hub model
    repo: exactly the files `actmerge verify` recorded. Refuses unverified checkpoints, any file added,
    changed or removed since verification, symlinks, and non-actmerge directories; the token comes
    from HF_TOKEN or `hf auth login`."""
    from .. import hub

    res = hub.push(
        checkpoint,
        repo_id,
        private=private,
        revision=revision,
        commit_message=commit_message,
        verify_required=not no_verify,
        force=force,
        dry_run=dry_run,
        log=lambda msg: out.print(msg, highlight=False, markup=False, soft_wrap=True),
    )
    if res.dry_run:
        out.print("nothing was uploaded (dry run).")
    else:
        out.print(f"[green]pushed[/] {len(res.files)} files → {res.url}", highlight=False, soft_wrap=True)


@app.command()
@handled
def verify(
    checkpoint: Annotated[Path, typer.Argument(help="Baked checkpoint or pipeline directory.")],
    base: Annotated[str | None, typer.Option(help="Base model (default: from actmerge/bake.json).")] = None,
    maps: Annotated[
        Path | None, typer.Option("--maps", "-m", help="Maps file (default: the checkpoint's).")
    ] = None,
    strength: Annotated[
        float | None, typer.Option("--strength", "-s", help="λ (default: the bake's).")
    ] = None,
    tolerance: Annotated[
        float | None, typer.Option(help="Max |Δlogit| (default by dtype: fp32 1e-3).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    runtime: Annotated[
        str, typer.Option(help="transformers (fresh process), or llama.cpp (GGUF in llama-cpp-python).")
    ] = "transformers",
    outtype: Annotated[str, typer.Option(help="With --runtime llama.cpp: f32, f16, bf16 or q8_0.")] = "f32",
    device: Device = None,
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
):
    """Hooked base model vs the checkpoint reloaded by plain transformers (or diffusers) in a fresh
    process, or run in llama.cpp with --runtime llama.cpp; exit 5 above tolerance. With a device map or
    --max-memory: one model at a time under it (the base, then the checkpoint), layers beyond it on disk."""
    from .. import pipeline
    from .render import verification

    if runtime not in ("transformers", "llama.cpp"):
        raise typer.BadParameter("--runtime must be 'transformers' or 'llama.cpp'.")
    options = pipeline.VerifyOptions(  # every verify flag, mapped onto its field here
        strength=strength,
        tolerance=tolerance,
        placement=placement_of(device, device_map, max_memory, offload_folder),
        runtime=runtime,
        outtype=outtype,
    )
    rep = pipeline.verify(checkpoint, base=base, maps=maps, options=options, progress=not as_json, log=log)
    print(rep.to_json()) if as_json else verification(rep)
    if not rep.passed:
        raise typer.Exit(5)


@app.command()
@handled
def sites(
    model: Annotated[
        str | None, typer.Argument(help="Model or pipeline (optional): what folds for it.")
    ] = None,
    target: Annotated[list[str] | None, typer.Option("--target", "-t", help="Restrict to runtimes.")] = None,
    revision: Revision = None,
):
    """The site vocabulary: per architecture, where each site lives and whether a scale/shift folds there."""
    from .. import pipeline
    from .render import sites as render_sites

    render_sites(*pipeline.sites(model, targets=target or (), revision=revision, log=log))
