"""Command line: a thin Typer layer over ``actmerge.pipeline``. Library errors become messages and
exit codes here, and only here (set ACTMERGE_DEBUG=1 for tracebacks)."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .errors import ActmergeError

app = typer.Typer(
    help="Bake activation steering (Linear-AcT, Mean-AcT or LinEAS maps) into model weights: fit maps on two prompt sets, "
    "fold them at a fixed strength into norms, weights and biases, and write a standalone checkpoint "
    "that plain transformers / vLLM / llama.cpp load. Built-in model: gemma-3-270m.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True, soft_wrap=True)

Model = Annotated[
    str, typer.Argument(help="Hub id, local HF directory, .gguf file, or the built-in 'gemma-3-270m'.")
]
RecipeOpt = Annotated[Path | None, typer.Option("--recipe", "-r", help="Recipe YAML (see recipes/).")]
RecipesOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--recipe", "-r", help="Recipe YAML (see recipes/). Repeat to compose recipes: one --strength each."
    ),
]
Revision = Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit) of MODEL.")]


def _pick_device(value: str | None) -> str:
    from .errors import PlacementError
    from .placement import pick_device

    try:
        return pick_device(value)
    except PlacementError as exc:
        raise typer.BadParameter(str(exc)) from None


def _check_max_memory(value: str | None) -> str | None:
    from .errors import PlacementError
    from .placement import parse_max_memory

    try:
        parse_max_memory(value)
    except PlacementError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


Device = Annotated[
    str | None,
    typer.Option(
        help="Torch device for fitting/verification, e.g. cpu, cuda, cuda:1 (default: cuda when present, else cpu).",
        callback=_pick_device,
    ),
]
DeviceMap = Annotated[
    str | None,
    typer.Option(
        "--device-map",
        help="Spread a model larger than memory with accelerate: auto, balanced, balanced_low_0 or sequential "
        "(implied by --max-memory / --offload-folder).",
    ),
]
MaxMemory = Annotated[
    str | None,
    typer.Option(
        "--max-memory",
        help="Memory budget per device for --device-map, e.g. cpu=2GiB or 0=20GiB,cpu=30GiB (GPU index, cpu, "
        "mps or disk); layers beyond it stay on disk and are read in for their forward.",
        callback=_check_max_memory,
    ),
]
OffloadFolder = Annotated[
    Path | None,
    typer.Option(
        "--offload-folder",
        help="Directory for offloaded weights that must be rewritten (weights used as stored are read "
        "from the checkpoint's own safetensors files and need none).",
    ),
]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
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


def _budget(max_ppl_ratio: float | None, max_kl: float | None):
    from .tune import Budget

    return Budget(max_ppl_ratio if max_ppl_ratio or max_kl else 1.10, max_kl)


def handled(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ActmergeError as exc:
            if os.environ.get("ACTMERGE_DEBUG"):
                raise
            err.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("[red]interrupted[/]: nothing was written (partial output is removed).")
            raise typer.Exit(130) from None

    return wrapper


def _log(msg: str) -> None:
    err.print(msg, highlight=False)


def _strengths(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"{text!r}: give a number or a comma-separated list, e.g. 1.0 or 0.5,1.0"
        ) from None


@app.command()
@handled
def fit(
    model: Model,
    recipe: Annotated[Path, typer.Option("--recipe", "-r", help="Recipe YAML.")],
    output: Annotated[Path, typer.Option("-o", "--out", help="Maps file to write (.safetensors).")],
    revision: Revision = None,
    device: Device = None,
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
    force: Force = False,
):
    """Fit transport maps on the recipe's source/target sentences and write a maps file."""
    from . import pipeline

    if output.exists() and not force:
        raise ActmergeError(f"{output} exists: choose another -o or pass --force.")
    from . import diffusion

    if diffusion.is_pipeline(model, revision):  # a diffusers pipeline: first-step statistics
        from .diffusion.recipe import load_diffusion_recipe

        if device_map or max_memory or offload_folder:
            raise ActmergeError(
                "--device-map/--max-memory/--offload-folder are for LLMs; diffusers pipelines load whole."
            )

        src = diffusion.resolve_pipeline(model, revision)
        res = diffusion.fit_pipeline(src, load_diffusion_recipe(recipe), device=device, log=_log)
    else:
        res = pipeline.fit(
            model,
            recipe,
            revision=revision,
            device=device,
            device_map=device_map,
            max_memory=max_memory,
            offload_folder=offload_folder,
            log=_log,
        )
    res.maps.save(output)
    out.print(f"wrote {len(res.maps)} maps to {output}")


@app.command()
@handled
def bake(
    model: Model,
    recipe: RecipesOpt = None,
    maps: Annotated[Path | None, typer.Option("--maps", "-m", help="Maps file from `actmerge fit`.")] = None,
    strength: Annotated[
        str | None,
        typer.Option(
            "--strength",
            "-s",
            help="λ, or several: 0.5,1.0 (one sub-directory each), or 'auto': the strength `actmerge tune` "
            "chose within --max-ppl-ratio/--max-kl (tuned now if none is recorded). Default: the recipe's.",
        ),
    ] = None,
    max_ppl_ratio: MaxPplRatio = None,
    max_kl: MaxKl = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--out", help="Output directory (must not exist unless --force).")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the fold plan and stop.")] = False,
    target: Annotated[
        list[str] | None,
        typer.Option(
            "--target",
            "-t",
            help="Runtime that must load the result: transformers, vllm, llama.cpp (repeatable).",
        ),
    ] = None,
    shift_policy: Annotated[
        str,
        typer.Option(
            help="'error': refuse shifts that cannot fold; 'drop': bake their scales only and report the deviation."
        ),
    ] = "error",
    flags: Annotated[
        bool,
        typer.Option(
            "--flags/--no-flags", help="Allow config flags (e.g. attention_bias) that add biases for shifts."
        ),
    ] = True,
    verify: Annotated[
        bool, typer.Option("--verify", help="Verify the result in a fresh process after writing.")
    ] = False,
    evaluate: Annotated[
        bool,
        typer.Option(
            "--eval",
            help="Evaluate base vs baked on the recipe's eval prompts; the table goes into the model card.",
        ),
    ] = False,
    push_to_hub: Annotated[
        str | None,
        typer.Option(
            "--push-to-hub",
            metavar="REPO_ID",
            help="After writing, verify each checkpoint and upload it to this Hub model repo (created if "
            "missing; several strengths go to REPO_ID-lambda-<λ>). Needs HF_TOKEN or `hf auth login`.",
        ),
    ] = None,
    private: Annotated[
        bool, typer.Option("--private", help="With --push-to-hub: create the repo as private.")
    ] = False,
    as_llama: Annotated[
        bool,
        typer.Option(
            "--as-llama",
            help="Mistral only: write the checkpoint as LlamaForCausalLM so shifts fold into "
            "attention_bias/mlp_bias biases (refused when the sliding window binds).",
        ),
    ] = False,
    revision: Revision = None,
    device: Device = None,
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
    force: Force = False,
):
    """Fit (with --recipe) or load (--maps) maps, fold them at strength λ, and write a checkpoint.

    Several --recipe options compose: each recipe is fitted and applied at its own strength
    (--strength 1.0,0.5 gives one per recipe), maps at shared sites compose, one checkpoint is baked."""
    from . import pipeline
    from .fold import describe

    if shift_policy not in ("error", "drop"):
        raise typer.BadParameter("--shift-policy must be 'error' or 'drop'.")
    from .diffusion import is_pipeline

    if is_pipeline(model, revision):  # a diffusers pipeline (model_index.json): actmerge.diffusion
        from .diffusion import commands

        unsupported = {"--target": bool(target), "--as-llama": as_llama, "--push-to-hub": bool(push_to_hub)}
        unsupported |= {"--eval": evaluate, "--no-flags": not flags}
        unsupported |= {"--device-map": bool(device_map), "--max-memory": bool(max_memory)}
        unsupported |= {"--offload-folder": offload_folder is not None}
        lams = _strengths(strength) if strength else None
        kw = dict(maps=maps, strengths=lams, output=output, shift_policy=shift_policy, dry_run=dry_run)
        kw |= dict(force=force, revision=revision, device=device, verify=verify, log=_log)
        if not commands.bake(out, model, recipes=recipe or [], unsupported=unsupported, **kw):
            raise typer.Exit(5)
        return
    if push_to_hub:
        from . import hub

        if dry_run:
            raise typer.BadParameter("--push-to-hub needs a written checkpoint: drop --dry-run.")
        hub.validate_repo_id(push_to_hub)
        hub.require_token()  # before the (slow) fit, not after it
    auto = strength is not None and strength.strip() == "auto"
    lams = _strengths(strength) if strength and not auto else None
    results = pipeline.bake(
        model,
        recipe=recipe or None,
        maps=maps,
        strengths=lams,
        out=output,
        targets=target or (),
        shift_policy=shift_policy,
        allow_flags=flags,
        force=force,
        dry_run=dry_run,
        revision=revision,
        device=device,
        device_map=device_map,
        max_memory=max_memory,
        offload_folder=offload_folder,
        log=_log,
        evaluate_after=evaluate,
        as_llama=as_llama,
        tune_budget=_budget(max_ppl_ratio, max_kl) if auto else None,
    )
    for res in results:
        _plan_table(describe(res.plan), res.strength)
        patch = res.plan.config_patch
        out.print(
            f"config changes: {', '.join(f'{k}={v}' for k, v in patch.items()) or 'none'}; "
            f"loads in: {', '.join(sorted(res.plan.runtimes))}"
        )
        for note in res.notes:
            out.print(f"[yellow]note:[/] {note}")
        if res.evaluation:
            out.print(res.evaluation)
        if res.out:
            out.print(f"[green]wrote[/] {res.out} (bake {res.seconds:.1f}s)")
            if verify or push_to_hub:  # a push publishes verified checkpoints only
                rep = pipeline.verify(res.out, device=device, log=_log)
                _verify_print(rep)
                if not rep.passed:
                    raise typer.Exit(5)
    if push_to_hub:
        for res in results:
            repo = push_to_hub if len(results) == 1 else hub.strength_repo_id(push_to_hub, res.strength)
            pushed = hub.push(res.out, repo, private=private, verify_required=True, log=_log)
            out.print(f"[green]pushed[/] {res.out} → {pushed.url}")


@app.command()
@handled
def push(
    checkpoint: Annotated[Path, typer.Argument(help="Baked checkpoint directory (from `actmerge bake`).")],
    repo_id: Annotated[
        str | None,
        typer.Argument(
            help="Hub model repo, 'user/name' (created if missing). Default: <you>/<base>-<recipe>."
        ),
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private.")] = False,
    revision: Annotated[
        str | None,
        typer.Option("--revision", help="Branch to upload to (created if missing). Default: main."),
    ] = None,
    commit_message: Annotated[
        str | None, typer.Option("--commit-message", help="Commit message on the Hub.")
    ] = None,
    no_verify: Annotated[
        bool,
        typer.Option(
            "--no-verify",
            help="Publish without a passing actmerge/verify.json (by default `actmerge verify` must have passed).",
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Upload a directory that is not an actmerge output.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the files that would be uploaded; upload nothing.")
    ] = False,
):
    """Upload a baked checkpoint (weights, config, tokenizer, model card, actmerge/ provenance) to a
    Hugging Face Hub model repo. Refuses unverified checkpoints and non-actmerge directories; the token
    comes from HF_TOKEN or `hf auth login`."""
    from . import hub

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


def _plan_table(rows: list[dict], strength: float) -> None:
    active = [r for r in rows if r["class"] != "identity"]
    table = Table(title=f"fold plan at λ = {strength:g} ({len(active)} of {len(rows)} maps active)")
    for col in ("site", "class", "scale →", "shift →", "config", "note"):
        table.add_column(col, overflow="fold")
    shown = active if len(active) <= 40 else active[:20] + active[-20:]
    for r in shown:
        table.add_row(*(r[c] for c in ("site", "class", "scale →", "shift →", "config", "note")))
    out.print(table)
    if len(shown) < len(active):
        out.print(f"({len(active) - len(shown)} rows not shown; all in actmerge/bake.json)")


def _verify_print(rep) -> None:
    status = "[green]PASS[/]" if rep.passed else "[red]FAIL[/]"
    out.print(
        f"{status} max |Δlogit| = {rep.max_abs_logit_diff:.3g} (tolerance {rep.tolerance:g}; logits reach "
        f"{rep.max_abs_logit:.3g}); top-1 agreement {rep.argmax_agreement:.2%}; greedy tokens "
        f"{rep.greedy_agreement:.2%} over {rep.n_prompts} prompts"
    )


@app.command()
@handled
def verify(
    checkpoint: Annotated[Path, typer.Argument(help="Baked checkpoint directory.")],
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
        str,
        typer.Option(
            help="transformers (reload in a fresh process), or llama.cpp (export to GGUF, run in "
            "llama-cpp-python, next to the unbaked base's own round trip: the tolerance to beat)."
        ),
    ] = "transformers",
    outtype: Annotated[
        str, typer.Option(help="With --runtime llama.cpp: GGUF type of both exports (f32, f16, bf16, q8_0).")
    ] = "f32",
    device: Device = None,
):
    """Hooked base model vs the checkpoint reloaded by plain transformers in a fresh process (or run in
    llama.cpp with --runtime llama.cpp); exit 5 above tolerance."""
    from . import pipeline

    if runtime not in ("transformers", "llama.cpp"):
        raise typer.BadParameter("--runtime must be 'transformers' or 'llama.cpp'.")
    if (checkpoint / "model_index.json").is_file():  # a baked diffusers pipeline
        from .diffusion import commands

        kw = dict(base=base, maps=maps, strength=strength, tolerance=tolerance, device=device)
        if not commands.verify(out, checkpoint, as_json=as_json, **kw):
            raise typer.Exit(5)
        return
    rep = pipeline.verify(
        checkpoint,
        base=base,
        maps=maps,
        strength=strength,
        tolerance=tolerance,
        device=device,
        log=_log,
        runtime=runtime,
        outtype=outtype,
    )
    if as_json:
        print(rep.to_json())
    elif runtime == "llama.cpp":
        _llamacpp_print(rep)
    else:
        _verify_print(rep)
    if not rep.passed:
        raise typer.Exit(5)


def _llamacpp_print(rep) -> None:
    status = "[green]PASS[/]" if rep.passed else "[red]FAIL[/]"
    table = Table(title=f"transformers vs llama.cpp (GGUF {rep.outtype}, {rep.baked.n_prompts} prompts)")
    for col in ("model", "max |Δlogit|", "logits reach", "top-1", "greedy tokens", "tokenizer"):
        table.add_column(col, justify="right")
    for name, rt in (("base", rep.base), ("baked", rep.baked)):
        table.add_row(
            name,
            f"{rt.max_abs_logit_diff:.3g}",
            f"{rt.max_abs_logit:.3g}",
            f"{rt.argmax_agreement:.2%}",
            f"{rt.greedy_agreement:.2%}",
            "-" if rt.tokenizer_agreement is None else f"{rt.tokenizer_agreement:.0%}",
        )
    out.print(table)
    out.print("base: the unbaked base in transformers vs its GGUF; baked: hooked base vs baked GGUF")
    verdict = "≤" if rep.passed else ">"
    out.print(
        f"{status} baked max |Δlogit| {rep.baked.max_abs_logit_diff:.3g} {verdict} tolerance {rep.tolerance:.3g}"
    )
    if rep.stripped:
        out.print(f"left out {len(rep.stripped)} all-zero biases llama.cpp does not load")


@app.command("export-gguf")
@handled
def export_gguf(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory (e.g. from `actmerge bake`).")],
    output: Annotated[Path, typer.Option("-o", "--out", help="GGUF file to write.")],
    outtype: Annotated[str, typer.Option(help="f32, f16, bf16 or q8_0.")] = "f32",
    force: Force = False,
):
    """Convert a checkpoint to GGUF with llama.cpp's own converter (fetched once from the pinned
    llama-cpp-python sdist, or $ACTMERGE_LLAMA_CPP). All-zero biases llama.cpp does not load are
    left out; non-zero ones are refused."""
    from .gguf_export import export_gguf as run

    res = run(checkpoint, output, outtype=outtype, force=force, log=_log)
    out.print(f"[green]wrote[/] {res.out} ({res.outtype}, {res.seconds:.1f}s)")


@app.command("export-control-vector")
@handled
def export_control_vector(
    maps: Annotated[
        Path,
        typer.Argument(
            help="Maps file from `actmerge fit` (a checkpoint's actmerge/maps.safetensors holds the maps as "
            "baked: shifts dropped with --shift-policy drop are zero there)."
        ),
    ],
    output: Annotated[Path, typer.Option("-o", "--out", help="Control-vector GGUF to write.")],
    model: Annotated[
        str | None, typer.Option("--model", help="Model the maps belong to (default: the maps' base_model).")
    ] = None,
    strength: Annotated[float, typer.Option("--strength", "-s", help="λ: the vector holds λ·β.")] = 1.0,
    partial: Annotated[
        bool,
        typer.Option("--partial", help="Export the shifts that can be a control vector; report the rest."),
    ] = False,
    force: Force = False,
):
    """Write the shifts of maps at layer-end sites (Gemma mlp_post, Llama-like mlp_out) as a llama.cpp
    control vector: the fallback for shifts with no home in the weights. Bake the same maps with
    --shift-policy drop (scales) and run `llama-cli -m baked.gguf --control-vector cv.gguf`."""
    from .control_vector import control_vector, write_control_vector
    from .maps import MapSet
    from .models import resolve
    from .sites import architecture_for, num_layers

    if output.exists() and not force:
        raise ActmergeError(f"{output} exists: choose another -o or pass --force.")
    mapset = MapSet.load(maps)
    name = model or mapset.base_model
    if not name:
        raise ActmergeError("the maps file names no base model: pass --model MODEL.")
    config = resolve(name, log=_log).config
    cv = control_vector(mapset, config, strength, partial=partial)
    n = num_layers(architecture_for(config), config)
    write_control_vector(cv, output, model_hint=config.get("model_type", ""), n_layers=n)
    out.print(
        f"[green]wrote[/] {output}: {len(cv.directions)} directions (layers {', '.join(map(str, sorted(cv.directions)))})"
    )
    if cv.elsewhere:
        out.print(
            f"{len(cv.elsewhere)} map(s) with shifts elsewhere are not in the vector (bake them into the weights)"
        )


@app.command()
@handled
def compose(
    maps: Annotated[list[Path], typer.Argument(help="Maps files, applied in this order.")],
    output: Annotated[Path, typer.Option("-o", "--out", help="Composed maps file to write.")],
    strength: Annotated[str, typer.Option("--strength", "-s", help="One λ per maps file, e.g. 1.0,0.5.")],
    force: Force = False,
):
    """Compose maps files (each at its own strength) into one maps file, to bake at strength 1."""
    from .errors import RecipeError
    from .maps import MapSet
    from .pipeline import compose_all

    lams = _strengths(strength)
    if len(maps) < 2 or len(lams) != len(maps):
        raise RecipeError(
            f"compose needs ≥ 2 maps files and one strength each (got {len(maps)} files, {len(lams)} strengths)."
        )
    if output.exists() and not force:
        raise ActmergeError(f"{output} exists: choose another -o or pass --force.")
    sets = [MapSet.load(p) for p in maps]
    composed = compose_all(sets, lams)
    composed.save(output)
    out.print(f"wrote {len(composed)} composed maps to {output}; bake it with --strength 1")


@app.command()
@handled
def tune(
    model: Model,
    recipe: Annotated[
        Path, typer.Option("--recipe", "-r", help="Recipe YAML with tune_prompts/tune_neutral.")
    ],
    output: Annotated[
        Path, typer.Option("-o", "--out", help="Report directory (tune.json, tune.png).")
    ] = Path("tune"),
    max_ppl_ratio: MaxPplRatio = None,
    max_kl: MaxKl = None,
    maps: Annotated[
        Path | None,
        typer.Option("--maps", "-m", help="Maps already fitted from this recipe (skips the fit)."),
    ] = None,
    max_strength: Annotated[float, typer.Option(help="Largest λ tried.")] = 2.0,
    step: Annotated[float, typer.Option(help="Coarse grid step in λ.")] = 0.25,
    tol: Annotated[float, typer.Option(help="Bisection tolerance in λ.")] = 0.02,
    curve: Annotated[
        bool, typer.Option(help="Measure the behaviour at every grid point (--no-curve: only at the choice).")
    ] = True,
    device: Device = None,
):
    """Find the strongest steering within a cost budget on the recipe's tuning split (never its eval
    prompts): fit once, hooked previews on a λ grid, then bisection. Bake it with --strength auto."""
    from .tune import tune as run_tune

    res = run_tune(
        pipeline_load(model, device),
        recipe,
        maps=maps,
        budget=_budget(max_ppl_ratio, max_kl),
        max_strength=max_strength,
        step=step,
        tol=tol,
        out=output,
        curve=curve,
        log=_log,
    )
    table = Table(title=f"{res.model} · {res.recipe}: {res.metric} vs cost (tuning split)")
    for col in ("λ", res.metric, "ppl ratio", "KL", "first-token KL", "budget"):
        table.add_column(col, justify="right")
    for p in sorted(res.points, key=lambda p: p.strength):
        mark = " ◀ chosen" if p.strength == res.strength else ""
        beh = "-" if p.behaviour is None else f"{p.behaviour:.3g}"
        c = p.cost
        table.add_row(
            f"{p.strength:g}",
            beh,
            f"{c['perplexity_ratio']:.4f}",
            f"{c['kl']:.4g}",
            f"{c.get('first_token_kl', 0):.4g}",
            ("ok" if p.within else "over") + mark,
        )
    out.print(table)
    status = "[green]chose[/]" if res.met else "[red]budget not met[/]; best point"
    out.print(f"{status} λ = {res.strength:g} ({res.budget.describe()}): {res.note}")
    out.print(
        f"wrote {output / 'tune.json'} and {output / 'tune.png'}; bake it with "
        f"`actmerge bake {model} --recipe {recipe} --strength auto"
        + (f" --max-ppl-ratio {res.budget.max_ppl_ratio:g}" if res.budget.max_ppl_ratio else "")
        + (f" --max-kl {res.budget.max_kl:g}" if res.budget.max_kl else "")
        + " -o OUT`"
    )
    if not res.met:
        raise typer.Exit(6)


def pipeline_load(model: str, device: str | None):
    from . import pipeline

    return pipeline.load(model, device=device, log=_log)


@app.command("eval")
@handled
def eval_(
    model: Model,
    output: Annotated[Path, typer.Option("-o", "--out", help="Report directory (report.json, sweep.png).")],
    recipe: RecipeOpt = None,
    maps: Annotated[Path | None, typer.Option("--maps", "-m", help="Maps file for hooked previews.")] = None,
    strengths: Annotated[
        str, typer.Option(help="Hooked strengths to preview, e.g. 0,0.25,0.5,0.75,1 (empty: none).")
    ] = "0,0.25,0.5,0.75,1",
    baked: Annotated[
        list[Path] | None,
        typer.Option("--baked", help="Baked checkpoint directory to evaluate too (repeatable)."),
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option(help="Prompts file (default: the recipe's eval_prompts).")
    ] = None,
    neutral: Annotated[
        Path | None,
        typer.Option(help="Neutral text for perplexity (default: the recipe's, else the shipped corpus)."),
    ] = None,
    metrics: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated: toxicity, concept, perplexity, similarity (default: the recipe's)."
        ),
    ] = None,
    scorer: Annotated[
        str | None, typer.Option(help="Toxicity scorer: profanity (offline) or hf:<model id>.")
    ] = None,
    keywords: Annotated[Path | None, typer.Option(help="Concept keywords file (one per line).")] = None,
    sample: Annotated[
        bool,
        typer.Option(
            "--sample",
            help="The paper's sampling (T=1, top_p=0.3, repetition penalty 1.2, 32 tokens) instead of greedy.",
        ),
    ] = False,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="New tokens per continuation (default 24 greedy, 32 sampled).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Use only the first N prompts.")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed (default: the recipe's).")] = None,
    clamped: Annotated[
        bool,
        typer.Option(
            help="With a Linear-AcT --recipe: also rows for ml-act's clamped variant (transport only inside "
            "the source support; not bakeable), to show what the unclamped, bakeable maps change.",
        ),
    ] = True,
    lm_eval: Annotated[
        str | None,
        typer.Option(
            "--lm-eval",
            help="lm-evaluation-harness tasks (comma-separated, e.g. mmlu) on the base and each --baked "
            "directory; needs actmerge[lmeval].",
        ),
    ] = None,
    lm_eval_include: Annotated[
        Path | None,
        typer.Option(
            "--lm-eval-include", help="Directory of local lm-eval task YAMLs (lm-eval's --include_path)."
        ),
    ] = None,
    lm_eval_limit: Annotated[
        int | None, typer.Option("--lm-eval-limit", help="lm-eval: only the first N documents per task.")
    ] = None,
    revision: Revision = None,
    device: Device = None,
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
):
    """Measure what steering does: base, hooked previews at several strengths and baked checkpoints on
    identical prompts — a table, report.json and sweep.png (each metric vs λ)."""
    from . import pipeline
    from .recipe import read_sentences
    from .sweep import markdown_table

    lams = _strengths(strengths) if strengths.strip() else []
    report = pipeline.evaluate(
        model,
        recipe=recipe,
        maps=maps,
        strengths=lams,
        baked=baked or [],
        out=output,
        clamped=clamped,
        revision=revision,
        device=device,
        device_map=device_map,
        max_memory=max_memory,
        offload_folder=offload_folder,
        log=_log,
        prompts=read_sentences(prompts) if prompts else None,
        neutral=read_sentences(neutral) if neutral else None,
        metrics=[m.strip() for m in metrics.split(",")] if metrics else None,
        scorer=scorer,
        keywords=read_sentences(keywords) if keywords else None,
        sample=sample,
        max_new_tokens=max_new_tokens,
        limit=limit,
        seed=seed,
        lm_eval=[t.strip() for t in lm_eval.split(",") if t.strip()] if lm_eval else [],
        lm_eval_include=lm_eval_include,
        lm_eval_limit=lm_eval_limit,
    )
    _report_table(report)
    out.print(markdown_table(report).splitlines()[-1])
    for row in report.rows:
        for s in row.samples[:2]:
            out.print(f"[dim]{row.label}[/] {s['prompt']!r} → {s['text'].strip()!r}", highlight=False)
    out.print(f"wrote {output / 'report.json'} and {output / 'sweep.png'}")


def _report_table(report) -> None:
    from .sweep import cell, columns

    names = columns(report)
    table = Table(title=f"{report.model}: evaluation")
    table.add_column("row")
    for n in names:
        table.add_column(n, justify="right")
    table.add_column("time", justify="right")
    for r in report.rows:
        table.add_row(r.label, *(cell(r, n) for n in names), f"{r.seconds:.0f}s")
    out.print(table)


@app.command()
@handled
def sites(
    model: Annotated[
        str | None, typer.Argument(help="Model (optional): show what folds for its config.")
    ] = None,
    target: Annotated[list[str] | None, typer.Option("--target", "-t", help="Restrict to runtimes.")] = None,
    revision: Revision = None,
):
    """The site vocabulary: per architecture, where each site lives and whether a scale/shift folds there."""
    from .fold import capabilities
    from .models import resolve
    from .sites import ARCHITECTURES, architecture_for

    if model is not None and (Path(model) / "model_index.json").is_file():  # a diffusers pipeline
        from .diffusion import commands

        return commands.sites(out, model, revision)
    if model is None:
        for arch in ARCHITECTURES:
            table = Table(
                title=f"{arch.name} ({', '.join(arch.model_types)}) — {arch.notes}", title_justify="left"
            )
            for col in ("site", "module", "side", "fold", "about"):
                table.add_column(col)
            for name, rule in arch.sites.items():
                table.add_row(name, f"{arch.layers}.{rule.module}", rule.side, rule.fold, rule.about)
            out.print(table)
        out.print(
            "Pass a MODEL to see which shifts fold for its config (exact / exact+flags / not foldable)."
        )
        return
    config = resolve(model, revision, log=_log).config
    arch = architecture_for(config)
    rows = capabilities(arch, config, frozenset(target or ()))
    table = Table(title=f"{model}: {arch.name}", title_justify="left")
    for col in ("site", "module", "side", "scale", "shift", "runtimes (shift)", "why"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            *(r[c] for c in ("site", "module", "side", "scale", "shift", "runtimes (shift)", "why"))
        )
    out.print(table)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
