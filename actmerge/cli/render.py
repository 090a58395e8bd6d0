"""How results look in a terminal: every table and verdict the CLI prints, readable at 80 columns
(module paths are shortened and wrap at dots, never mid-word). Data in, rich output out; nothing
here computes anything."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..card import fold_cells

out = Console()
err = Console(stderr=True, soft_wrap=True)


def _dots(text: str) -> str:
    """Allow wrapping after dots and underscores-free separators (a zero-width space), so long module
    paths break between parts rather than mid-word."""
    return text.replace(".", ".\u200b").replace(", ", ",\u200b ")


def _table(title: str, columns: list[str], rows: list[tuple], *, right: tuple[str, ...] = ()) -> Table:
    import re

    table = Table(title=title, title_justify="left", expand=False)
    cells = [[_dots(str(c)) for c in row] for row in rows]
    for i, col in enumerate(columns):  # wide enough for the longest unbreakable word of the column
        words = [w for row in cells for w in re.split(r"[\s\u200b]+", row[i])] + col.split("\n")
        table.add_column(
            col,
            justify="right" if col in right else "left",
            overflow="fold",
            min_width=min(28, max(map(len, words))),
        )
    for row in cells:
        table.add_row(*row)
    return table


def fold_plan(rows: list[dict], strength: float) -> None:
    """The dry-run / bake table: one row per active map (40 at most, all in actmerge/bake.json)."""
    active = [r for r in rows if r["exactness"] != "identity"]
    shown = active if len(active) <= 40 else active[:20] + active[-20:]
    cells = [fold_cells(r) for r in shown]
    notes = [r["note"] for r in shown]
    cols = ["site", "class", "scale →", "shift →", "config"]
    data = [(*c, n) for c, n in zip(cells, notes, strict=True)] if any(notes) else cells
    if any(notes):
        cols.append("note")
    out.print(_table(f"fold plan at λ = {strength:g} ({len(active)} of {len(rows)} maps active)", cols, data))
    if len(shown) < len(active):
        out.print(f"({len(active) - len(shown)} rows not shown; all in actmerge/bake.json)")


def bake_result(res) -> None:
    fold_plan(res.plan.rows(), res.strength)
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
    if res.verification is not None:
        verification(res.verification)
    if res.pushed is not None:
        out.print(f"[green]pushed[/] {res.out} → {res.pushed.url}")


def verification(rep) -> None:
    """Any verify report: language model (transformers or llama.cpp) or pipeline."""
    if hasattr(rep, "groups"):
        return _pipeline_verification(rep)
    if hasattr(rep, "baked"):
        return _llamacpp_verification(rep)
    status = "[green]PASS[/]" if rep.passed else "[red]FAIL[/]"
    out.print(
        f"{status} max |Δlogit| = {rep.max_abs_logit_diff:.3g} (tolerance {rep.tolerance:g}; logits reach "
        f"{rep.max_abs_logit:.3g}); top-1 agreement {rep.argmax_agreement:.2%}; greedy tokens "
        f"{rep.greedy_agreement:.2%} over {rep.n_prompts} prompts"
    )


def _pipeline_verification(rep) -> None:
    rows = [
        (name, g.n_tensors, f"{g.max_abs:.3g}", f"{g.max_ref:.3g}", f"{g.max_rel:.3g}")
        for name, g in rep.groups.items()
    ]
    title = f"hooked base vs baked pipeline in plain diffusers ({rep.n_prompts} prompts, {rep.steps} steps)"
    cols = ["output", "tensors", "max |Δ|", "max |ref|", "max rel."]
    out.print(_table(title, cols, rows, right=tuple(cols[1:])))
    if rep.moved_shifts:
        out.print(f"{len(rep.moved_shifts)} text-encoder shift(s) live in the denoiser: compared end to end")
    status = "[green]PASS[/]" if rep.passed else "[red]FAIL[/]"
    out.print(f"{status} max relative error {rep.max_rel:.3g} (tolerance {rep.tolerance:g})")


def _llamacpp_verification(rep) -> None:
    rows = []
    runs = [("base", rep.base), ("baked", rep.baked)]
    if rep.exact is not None:
        runs += [("exact fold", rep.exact), ("re-quantised", rep.requantised)]
    for name, rt in runs:
        tokenizer = "-" if rt.tokenizer_agreement is None else f"{rt.tokenizer_agreement:.0%}"
        rows.append(
            (
                name,
                f"{rt.max_abs_logit_diff:.3g}",
                f"{rt.max_abs_logit:.3g}",
                f"{rt.argmax_agreement:.2%}",
                f"{rt.greedy_agreement:.2%}",
                tokenizer,
            )
        )
    cols = ["model", "max |Δlogit|", "logits reach", "top-1", "greedy", "tokenizer"]
    title = f"transformers vs llama.cpp (GGUF {rep.outtype}, {rep.baked.n_prompts} prompts)"
    out.print(_table(title, cols, rows, right=tuple(cols[1:])))
    out.print("base: the unbaked base in transformers vs its GGUF; baked: hooked base vs baked GGUF")
    judged, what = rep.baked, "baked"
    if rep.exact is not None:
        out.print(
            "exact fold: hooked base vs the same GGUF with the re-quantised matrices in float32; "
            "re-quantised: that file vs the baked GGUF, both in llama.cpp (the re-quantisation's cost)"
        )
        judged, what = rep.exact, "exact fold"
    status = "[green]PASS[/]" if rep.passed else "[red]FAIL[/]"
    verdict = "≤" if rep.passed else ">"
    out.print(
        f"{status} {what} max |Δlogit| {judged.max_abs_logit_diff:.3g} {verdict} tolerance {rep.tolerance:.3g}"
    )
    if rep.stripped:
        out.print(f"left out {len(rep.stripped)} all-zero biases llama.cpp does not load")


def _short_module(path: str) -> str:
    """``model.layers.{i}.self_attn.o_proj`` → ``self_attn.o_proj`` (the layer prefix is in the title)."""
    return path.split("{i}.", 1)[1] if "{i}." in path else path


def _prefix(rows: list[dict]) -> str:
    paths = [r["module"] for r in rows if "{i}." in r["module"]]
    return f" (modules under {paths[0].split('{i}.')[0]}{{i}})" if paths else ""


def sites(title: str, rows: list[dict]) -> None:
    if not rows:
        out.print(f"{title}: no sites")
        return
    if "arch" in rows[0]:  # the vocabulary: one table per architecture
        for arch in dict.fromkeys(r["arch"] for r in rows):
            mine = [r for r in rows if r["arch"] == arch]
            data = [(r["site"], _short_module(r["module"]), r["side"], r["fold"]) for r in mine]
            out.print(_table(arch + _prefix(mine), ["site", "module", "side", "fold"], data))
        out.print(
            "Pass a MODEL to see which shifts fold for its config (exact / exact+flags / not foldable)."
        )
        return
    if "component" in rows[0]:  # a pipeline
        data = [
            (r["component"], r["site"], _short_module(r["module"]), r["blocks"], r["shift"]) for r in rows
        ]
        out.print(_table(title, ["component", "site", "module", "blocks", "shift"], data))
        out.print(
            "Scales fold exactly at every listed site; recipes name sites as `site` or `component/site`."
        )
        return
    data = []
    for r in rows:  # the runtimes that load a shift go under it: four columns fit 80 characters
        shift = r["shift"].replace(" (", "\n(")
        if r["runtimes (shift)"] != "-":
            shift += f"\nloads in: {r['runtimes (shift)']}"
        data.append((r["site"], _short_module(r["module"]), r["side"], shift))
    out.print(_table(title + _prefix(rows), ["site", "module", "side", "shift"], data))
    why = [f"{r['site']}: {r['why']}" for r in rows if r["why"]]
    for line in why:
        out.print(f"[dim]{line}[/]", highlight=False)
    out.print("Scales fold exactly at every site (no config change).")


def eval_report(report) -> None:
    from ..evaluation.tables import cell, columns, markdown_table

    names = columns(report)
    data = [(r.label, *(cell(r, n) for n in names), f"{r.seconds:.0f}s") for r in report.rows]
    out.print(_table(f"{report.model}: evaluation", ["row", *names, "time"], data, right=(*names, "time")))
    out.print(markdown_table(report).splitlines()[-1])
    for row in report.rows:
        for s in row.samples[:2]:
            out.print(f"[dim]{row.label}[/] {s['prompt']!r} → {s['text'].strip()!r}", highlight=False)


def tune_result(res, model: str, recipe, output, maps=None) -> None:
    """The trade-off table of ``actmerge tune`` (chosen point marked) and how to bake it."""
    conf = res.budget.confidence
    ci = f"\n[{res.budget.level()} CI]" if conf else ""  # a header line of its own: 80 columns
    kl_ci = ci if res.budget.max_kl is not None else ""  # the KL interval where KL is budgeted

    def cell(p, name: str, fmt: str, shown: bool) -> str:
        value = format(p.cost[name], fmt)
        if shown and name in p.interval:
            lo, hi = p.interval[name]
            value += f"\n[{lo:{fmt}}, {hi:{fmt}}]"
        return value

    cols = ["λ", res.metric, f"ppl ratio{ci}", f"KL{kl_ci}", "first-token\nKL", "budget"]
    rows = []
    for p in sorted(res.points, key=lambda p: p.strength):
        mark = " ◀ chosen" if p.strength == res.strength else ""
        rows.append(
            (
                f"{p.strength:g}",
                "-" if p.behaviour is None else f"{p.behaviour:.3g}",
                cell(p, "perplexity_ratio", ".4f" if not ci else ".3f", bool(ci)),
                cell(p, "kl", ".4g" if not kl_ci else ".3g", bool(kl_ci)),
                f"{p.cost.get('first_token_kl', 0):.4g}",
                ("ok" if p.within else "over") + mark,
            )
        )
    title = f"{res.model} · {res.recipe}: {res.metric} vs cost (tuning split)"
    out.print(_table(title, cols, rows, right=tuple(cols[:-1])))
    status = "[green]chose[/]" if res.met else "[red]budget not met[/]; best point"
    out.print(f"{status} λ = {res.strength:g} ({res.budget.describe()}): {res.note}")
    budget = (f" --max-ppl-ratio {res.budget.max_ppl_ratio:g}" if res.budget.max_ppl_ratio else "") + (
        f" --max-kl {res.budget.max_kl:g}" if res.budget.max_kl else ""
    )
    if conf:
        out.print(
            f"[CI]: the {res.budget.level()} bootstrap interval over the {res.n_tune_neutral} tuning neutral "
            "texts; a λ is within the budget when the interval's upper end is."
        )
    out.print(
        f"wrote {output / 'tune.json'} and {output / 'tune.png'}; bake it with "
        f"`actmerge bake {model} {f'--maps {maps}' if maps else f'--recipe {recipe}'} --strength auto{budget} -o OUT`"
    )
