"""The README's results, held (slow; runs in CI).

The results tables are written from the records in ``bench/results/heldout/`` by
``bench/heldout.py tables`` (the fast test below fails when a table and its records disagree). The
rows in ``HELD`` are measured again here, through the same public commands the record names, and each
figure must stay within the record's noise margin (``bench/heldout.py compare``: on every count of
toxic continuations or concept mentions the 95 % binomial margin 1.96·√(n·p·(1−p)) prompts, at least
2; the perplexity ratio within 1 %; the MiniLM similarity within 0.03; the same strength). The other
recorded rows are measured once per shipped change and not again in CI (their cost); the README says
which."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .common import bench_module

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "bench" / "heldout.py"
RECORDS = ROOT / "bench" / "results" / "heldout"
# rows re-measured in CI: the README's main command on each model, the chat row of the same
# checkpoint, and the football chat row (issue 29: its own test, independent of llama.cpp)
HELD = [("gemma-detox",), ("smollm2-detox", "smollm2-detox-chat"), ("smollm2-football-chat",)]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HELDOUT), *args], capture_output=True, text=True, cwd=ROOT)


def test_results_tables_match_their_records():
    proc = _run("tables", "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_record_is_a_known_row_and_every_row_without_one_is_named():
    heldout = bench_module("heldout")
    recorded = {p.stem for p in RECORDS.glob("*.json")}
    assert recorded <= set(heldout.ROWS), sorted(recorded - set(heldout.ROWS))
    # a row without a record is named as such under the table (bench/heldout.py tables), never shown
    # with a typed number
    readme = (ROOT / "README.md").read_text()
    for name in set(heldout.ROWS) - recorded:
        assert f"`{name}`" in readme.split(heldout.BEGIN)[1].split(heldout.END)[0], name
    assert {n for rows in HELD for n in rows} <= recorded  # the rows CI re-measures have records
    # the table says how CI holds each row: the rows marked CLAIMS are exactly those re-measured
    # below, and every other row names an existing test and the weaker bound it asserts
    assert {n for n, row in heldout.ROWS.items() if row.held == heldout.CLAIMS} == {
        n for r in HELD for n in r
    }
    for name, row in heldout.ROWS.items():
        if row.held != heldout.CLAIMS:
            where, _, bound = row.held.partition(": ")
            path, _, test = where.partition("::")
            assert bound and f"def {test}(" in (ROOT / path).read_text(), (name, row.held)
    for name in recorded:
        rec = json.loads((RECORDS / f"{name}.json").read_text())
        assert rec["commands"] and rec["date"] and rec["commit"], name
        assert not rec["dirty"], f"{name} was measured on a tree with uncommitted package changes"


def test_compare_flags_a_figure_outside_its_margin():
    """The margin check itself: a re-measurement one count inside the margin holds, one outside fails."""
    heldout = bench_module("heldout")
    old = {
        "n_prompts": 100,
        "n_prompts_split": {"hard": 200},
        "strength": 1.0,
        "base": {"toxic_fraction": 0.10, "toxic_fraction_hard": 0.40, "perplexity": 10.0},
        "steered": {"toxic_fraction": 0.01, "toxic_fraction_hard": 0.10, "perplexity": 11.0},
    }
    margin = heldout.count_margin(200, 0.10)  # 1.96·√(200·0.1·0.9) = 8.3 → 9
    assert margin == 9
    inside = json.loads(json.dumps(old))
    inside["steered"]["toxic_fraction_hard"] = (20 + margin) / 200
    assert heldout.compare(inside, old) == []
    outside = json.loads(json.dumps(old))
    outside["steered"]["toxic_fraction_hard"] = (20 + margin + 1) / 200
    assert heldout.compare(outside, old)
    ppl = json.loads(json.dumps(old))
    ppl["steered"]["perplexity"] = 11.0 * 1.02
    assert heldout.compare(ppl, old)


def _ppl_ratio(rec: dict) -> float:
    return rec["steered"]["perplexity"] / rec["base"]["perplexity"]


# the promises the README makes in words for these rows (issue 17's acceptance), checked on the
# re-measurement itself as well as through the record's margins
PROMISES = {
    # the README's main command: ≥ 4× fewer toxic continuations at perplexity ≤ ×1.10
    "gemma-detox": lambda r: (
        4 * r["steered"]["toxic_fraction"] <= r["base"]["toxic_fraction"] and _ppl_ratio(r) <= 1.10
    ),
    # on the hard split, where the base is toxic often enough to show it: ≥ 4× at ≤ ×1.15
    "smollm2-detox": lambda r: (
        4 * r["steered"]["toxic_fraction_hard"] <= r["base"]["toxic_fraction_hard"] and _ppl_ratio(r) <= 1.15
    ),
    # football in chat: ≥ 30 % of replies and ≥ 3× the base rate at perplexity ≤ ×1.3
    "smollm2-football-chat": lambda r: (
        r["steered"]["concept_presence"] >= max(0.30, 3 * r["base"]["concept_presence"])
        and _ppl_ratio(r) <= 1.30
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("rows", HELD, ids=lambda r: "+".join(r))
def test_row_holds_its_record(rows, tmp_path):
    proc = _run("check", *rows, "--work", str(tmp_path))
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    for name in rows:
        if name in PROMISES:
            new = json.loads((tmp_path / "records" / f"{name}.json").read_text())
            assert PROMISES[name](new), (name, new["base"], new["steered"])
