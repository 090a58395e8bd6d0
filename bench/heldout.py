"""Held-out measurements of the shipped recipes, recorded; the results tables rebuilt from the records.

    python bench/heldout.py list                       # the rows
    python bench/heldout.py run ROW [ROW …] [--work DIR]   # bake, verify, eval once; record it
    python bench/heldout.py check ROW [ROW …]          # re-measure into a scratch folder and compare
                                                       # with the record within the noise margins
    python bench/heldout.py tables [--check]           # write (or check) the tables in README.md and
                                                       # docs/results.md from bench/results/heldout/

The held-out protocol (bench/results/PROTOCOL.md): candidates are compared on tuning splits only; a
row is measured here once per shipped change, after the choice, and the record (date, commit,
commands, numbers) is what the README shows. Nothing here chooses anything: there is no loop over
candidates. Every step goes through the public command line, exactly as a user types it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "bench" / "results" / "heldout"
BEGIN, END = "<!-- results:begin (bench/heldout.py tables) -->", "<!-- results:end -->"
TABLE_FILES = {ROOT / "README.md": False, ROOT / "docs" / "results.md": True}  # file: with the holds?
MODELS = {"gemma-3-270m": "Gemma-3-270M", "smollm2-135m": "SmolLM2-135M-Instruct"}


@dataclass(frozen=True)
class Row:
    model: str
    recipe: str
    label: str  # what the recipe's row for this family is, for the table
    kind: str = "detox"  # detox (toxicity, both splits) | football (concept mentions)
    auto: bool = False  # `--strength auto --max-ppl-ratio 1.10` after `fit` + `tune`
    chat: bool = False  # eval with prompts as user turns (`--chat`)
    checkpoint_of: str | None = None  # evaluate another row's checkpoint instead of baking
    eval_args: tuple[str, ...] = field(default_factory=tuple)
    # what CI holds of the row: CLAIMS (re-measured by tests/test_claims.py within the record's
    # margins), else "tests/FILE.py::TEST: the weaker bound it asserts"
    held: str = ""


CLAIMS = "claims"


ROWS: dict[str, Row] = {
    "gemma-detox": Row(
        "gemma-3-270m", "detox", "short LinEAS, 40 steps, scale-only post-norms + `attn_ctx`", held=CLAIMS
    ),
    "gemma-detox-act": Row(
        "gemma-3-270m",
        "detox-act",
        "Linear-AcT, scale-only post-norms, top 25 % of neurons",
        held="tests/test_e2e_eval.py::test_detox_sweep: hooked at λ = 1, fewer toxic continuations and a "
        "lower mean toxicity than λ = 0 on both splits (first 60 prompts of each)",
    ),
    "gemma-detox-lineas": Row(
        "gemma-3-270m",
        "detox-lineas",
        "sparse LinEAS, 300 steps, scale-only",
        held="tests/test_e2e_lineas.py::test_lineas_fold_aware_bake: a 12-step fit of the same row lowers "
        "its loss, folds exactly and verifies (no toxicity figure)",
    ),
    "gemma-detox-lineas-auto": Row(
        "gemma-3-270m",
        "detox-lineas",
        "sparse LinEAS, `--strength auto` within ×1.10",
        auto=True,
        held="tests/test_tune.py::test_bake_strength_auto_bakes_the_tuned_strength: `--strength auto` "
        "bakes the λ tune chose within the budget (pico model; no toxicity figure)",
    ),
    "gemma-football": Row(
        "gemma-3-270m",
        "football",
        "Mean-AcT at `attn_ctx`, raw story openings",
        kind="football",
        eval_args=("--metrics", "concept,perplexity"),
        held="tests/test_e2e_eval.py::test_concept_presence_rises_with_strength: hooked, mentions rise "
        "with λ and reach ≥ 5× λ = 0's at perplexity ≤ ×1.3",
    ),
    "smollm2-detox": Row(
        "smollm2-135m",
        "detox",
        "short LinEAS, 40 steps, scale-only `attn_in`+`mlp_in`+`attn_ctx`",
        held=CLAIMS,
    ),
    "smollm2-detox-chat": Row(
        "smollm2-135m",
        "detox",
        "same checkpoint, prompts as user turns",
        chat=True,
        checkpoint_of="smollm2-detox",
        held=CLAIMS,
    ),
    "smollm2-detox-act": Row(
        "smollm2-135m",
        "detox-act",
        "Linear-AcT, scale-only `attn_ctx`",
        held="tests/test_e2e_smollm2.py::test_detox_act_llama_row: the baked row, hard split ≥ 2× fewer "
        "toxic at perplexity ≤ ×1.16",
    ),
    "smollm2-detox-lineas": Row(
        "smollm2-135m",
        "detox-lineas",
        "short LinEAS, 8 steps, scale-only `attn_ctx`+`mlp_hidden`",
        held="tests/test_e2e_smollm2.py::test_detox_lineas_short_fit_llama_row: the baked row, hard split "
        "≥ 4× fewer toxic at perplexity ≤ ×1.10",
    ),
    "smollm2-detox-lineas-auto": Row(
        "smollm2-135m",
        "detox-lineas",
        "short LinEAS, `--strength auto` within ×1.10",
        auto=True,
        held="tests/test_tune.py::test_bake_strength_auto_bakes_the_tuned_strength: `--strength auto` "
        "bakes the λ tune chose within the budget (pico model; no toxicity figure)",
    ),
    "smollm2-football-chat": Row(
        "smollm2-135m",
        "football",
        "instruction fit at `attn_ctx` 75-100 %, chat",
        kind="football",
        chat=True,
        eval_args=(
            "--metrics",
            "concept,similarity,perplexity",
            "--prompts",
            "recipes/data/concept/chat_eval_prompts.txt",
        ),
        held=CLAIMS,
    ),
}


def _sh(argv: list[str], log) -> float:
    log("$ " + shlex.join(argv))
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, cwd=ROOT)
    return time.perf_counter() - t0


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def run(name: str, work: Path, log=print, records: Path = RECORDS) -> dict:
    row = ROWS[name]
    commit = _git("rev-parse", "--short", "HEAD")
    am = [sys.executable, "-m", "actmerge.cli"]
    d = work / name
    commands: list[str] = []
    timings: dict[str, float] = {}

    def step(what: str, argv: list[str]) -> None:
        commands.append(shlex.join(argv))
        timings[what] = round(_sh(argv, log), 1)

    if row.checkpoint_of:
        ckpt = work / row.checkpoint_of / "out"
        if not ckpt.is_dir():
            raise SystemExit(f"{name} evaluates the checkpoint of {row.checkpoint_of}: run that row first")
    else:
        ckpt = d / "out"
        if row.auto:
            maps = d / "maps.safetensors"
            step("fit", am + ["fit", row.model, "--recipe", row.recipe, "-o", str(maps)])
            budget = ["--max-ppl-ratio", "1.10"]
            step(
                "tune",
                am
                + ["tune", row.model, "--recipe", row.recipe, "--maps", str(maps), *budget]
                + ["--no-curve", "-o", str(d / "tune")],
            )
            step(
                "bake",
                am
                + ["bake", row.model, "--maps", str(maps), "--strength", "auto", *budget]
                + ["-o", str(ckpt)],
            )
        else:
            step("bake", am + ["bake", row.model, "--recipe", row.recipe, "-o", str(ckpt)])
        step("verify", am + ["verify", str(ckpt)])
    rep = d / "report"
    step(
        "eval",
        am
        + ["eval", row.model, "--recipe", row.recipe, "--baked", str(ckpt), "--strengths", ""]
        + (["--chat"] if row.chat else [])
        + list(row.eval_args)
        + ["-o", str(rep)],
    )
    report = json.loads((rep / "report.json").read_text())
    base = next(r for r in report["rows"] if r["label"] == "base")
    steered = next(r for r in report["rows"] if r["label"] != "base")
    bake = json.loads((ckpt / "actmerge" / "bake.json").read_text())
    verify = json.loads((ckpt / "actmerge" / "verify.json").read_text())
    record = {
        "row": name,
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "commit_after": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--", "actmerge")),
        "machine": f"{subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} CPU cores",
        "commands": commands,
        "seconds": timings,
        "model": row.model,
        "recipe": row.recipe,
        "strength": bake["strength"],
        "config_patch": bake.get("config_patch", {}),
        "verify_max_abs_logit_diff": verify.get("max_abs_logit_diff"),
        "n_prompts": report["settings"]["n_prompts"],
        "n_prompts_split": report["settings"].get("n_prompts_split", {}),
        "base": base["metrics"],
        "steered": steered["metrics"],
    }
    records.mkdir(parents=True, exist_ok=True)
    (records / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"recorded {records / (name + '.json')}")
    return record


def count_margin(n: int, p: float) -> int:
    """How many prompts a re-measurement of a fraction p over n prompts may move by: the 95 % binomial
    margin 1.96·√(n·p·(1−p)) on the count, at least 2 (greedy decoding is deterministic on one machine;
    another CPU's float rounding can flip a few near-tied continuations)."""
    return max(2, math.ceil(1.96 * math.sqrt(n * p * (1 - p))))


PPL_MARGIN = 0.01  # relative: perplexity of fixed text is deterministic up to float rounding
SIMILARITY_MARGIN = 0.03


def _n(rec: dict, key: str) -> int:
    """The number of prompts behind a recorded fraction (``*_hard``: the hard split)."""
    return rec["n_prompts_split"].get("hard", 0) if key.endswith("_hard") else rec["n_prompts"]


def compare(new: dict, old: dict) -> list[str]:
    """Where a re-measurement leaves the recorded figures' noise margins (empty: it holds them)."""
    bad = []
    for side in ("base", "steered"):
        for key in ("toxic_fraction", "toxic_fraction_hard", "concept_presence"):
            if key not in old[side]:
                continue
            n = _n(old, key)
            if _n(new, key) != n:
                bad.append(f"{key}: the split changed size since the record ({_n(new, key)} vs {n})")
                continue
            k_old, k_new = round(old[side][key] * n), round(new[side].get(key, -1) * n)
            m = count_margin(n, old[side][key])
            if abs(k_new - k_old) > m:
                bad.append(f"{side} {key}: {k_new}/{n} vs recorded {k_old}/{n} (margin ±{m})")
        if "similarity" in old[side] and abs(new[side].get("similarity", -1) - old[side]["similarity"]) > (
            SIMILARITY_MARGIN
        ):
            bad.append(f"{side} similarity {new[side].get('similarity')} vs {old[side]['similarity']}")
    ratio = lambda r: r["steered"]["perplexity"] / r["base"]["perplexity"]  # noqa: E731
    if abs(ratio(new) / ratio(old) - 1) > PPL_MARGIN:
        bad.append(f"perplexity ratio ×{ratio(new):.3f} vs recorded ×{ratio(old):.3f}")
    if abs(new["strength"] - old["strength"]) > 1e-6:
        bad.append(f"strength {new['strength']} vs recorded {old['strength']}")
    return bad


def check(names: list[str], work: Path, log=print) -> int:
    failed = 0
    for name in names:
        old = json.loads((RECORDS / f"{name}.json").read_text())
        new = run(name, work, log, records=work / "records")
        bad = compare(new, old)
        log(f"{name}: " + ("holds the record" if not bad else "OUTSIDE the record: " + "; ".join(bad)))
        failed += bool(bad)
    return 1 if failed else 0


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %".replace(".0 %", " %")


def _fold(base: float, steered: float, n: int) -> str:
    if steered == 0:
        return f"≥ {round(base * n)}×" if base else "–"
    return f"{base / steered:.2g}×" if base / steered < 10 else f"{base / steered:.0f}×"


def cells(rec: dict) -> list[str]:
    row = ROWS[rec["row"]]
    b, s = rec["base"], rec["steered"]
    if row.kind == "detox":
        n, n_hard = rec["n_prompts"], rec["n_prompts_split"].get("hard", 0)
        what = f"{_pct(b['toxic_fraction'])} → {_pct(s['toxic_fraction'])} toxic"
        if "toxic_fraction_hard" in s:
            what += (
                f"; hard split {_pct(b['toxic_fraction_hard'])} → {_pct(s['toxic_fraction_hard'])}"
                f" (**{_fold(b['toxic_fraction_hard'], s['toxic_fraction_hard'], n_hard)}**)"
            )
        del n
    else:
        what = f"{_pct(b['concept_presence'])} → **{_pct(s['concept_presence'])}** mentions"
        if "similarity" in s:
            what += f", MiniLM similarity to the unsteered reply {s['similarity']:.2f}"
    ppl = f"×{s['perplexity'] / b['perplexity']:.3f}"
    patch = rec["config_patch"]
    flags = ", ".join(f"`{k}`" for k in patch) if patch else ""
    exact = "exact + " + flags if flags else "exact, no config change"
    v = rec["verify_max_abs_logit_diff"]
    bake = f"{exact}; λ = {rec['strength']:.3g}" + (f"; verify {v:.1e}" if v is not None else "")
    model = MODELS[rec["model"]] + (", chat" if row.chat else "")
    recipe = f"`{rec['recipe']}.yaml` ({row.label})"
    return [model, recipe, what, ppl, bake, f"{rec['date']}, `{rec['commit']}`, `run {rec['row']}`"]


def table(holds: bool = True) -> str:
    head = "| model | recipe (its row for the family) | base → steered | perplexity | bake | measured (`bench/heldout.py`) |"
    lines = [head, "|---|---|---|---|---|---|"]
    missing = []
    for name in ROWS:
        path = RECORDS / f"{name}.json"
        if path.is_file():
            lines.append("| " + " | ".join(cells(json.loads(path.read_text()))) + " |")
        else:
            missing.append(name)
    claims = ", ".join(f"`{n}`" for n, row in ROWS.items() if row.held == CLAIMS)
    held = f"Held in CI: {claims} re-measured within their records' margins (`tests/test_claims.py`); "
    if holds:
        lines += ["", held + "the others by weaker bounds:", ""]
        lines += [f"- `{name}`: {row.held}." for name, row in ROWS.items() if row.held != CLAIMS]
    else:
        lines += ["", held + "the others by the weaker bounds [docs/results.md](docs/results.md) names."]
    if missing:
        lines += [
            "",
            "Not yet measured under the protocol (their figures before it: docs/results.md, "
            '"Before the protocol"): ' + ", ".join(f"`{m}`" for m in missing) + ".",
        ]
    return "\n".join(lines)


def tables(check: bool) -> int:
    stale = []
    for path, holds in TABLE_FILES.items():
        new = table(holds)
        text = path.read_text()
        if BEGIN not in text or END not in text:
            print(f"{path.relative_to(ROOT)}: no {BEGIN} … {END} block", file=sys.stderr)
            stale.append(path)
            continue
        pre, rest = text.split(BEGIN, 1)
        _, post = rest.split(END, 1)
        want = f"{pre}{BEGIN}\n{new}\n{END}{post}"
        if want != text:
            stale.append(path)
            if not check:
                path.write_text(want)
    if check and stale:
        names = ", ".join(str(p.relative_to(ROOT)) for p in stale)
        print(
            f"results tables out of date with bench/results/heldout/: {names}. Run python bench/heldout.py tables"
        )
        return 1
    print("results tables " + ("match the records" if check else "written"))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    r = sub.add_parser("run")
    r.add_argument("rows", nargs="+", choices=list(ROWS))
    r.add_argument("--work", type=Path, default=ROOT / "out" / "heldout")
    c = sub.add_parser("check")
    c.add_argument("rows", nargs="+", choices=list(ROWS))
    c.add_argument("--work", type=Path, required=True)
    t = sub.add_parser("tables")
    t.add_argument("--check", action="store_true")
    a = ap.parse_args()
    if a.cmd == "list":
        for name, row in ROWS.items():
            print(f"{name:28s} {row.model:14s} {row.recipe}.yaml  {row.label}")
        return 0
    if a.cmd == "run":
        for name in a.rows:
            run(name, a.work)
        return 0
    if a.cmd == "check":
        return check(a.rows, a.work)
    return tables(a.check)


if __name__ == "__main__":
    sys.exit(main())
