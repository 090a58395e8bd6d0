"""Detox baked straight into a quantised GGUF, measured in llama.cpp (issue 27 item 1's acceptance).

- fast: ``llamacpp.gguf_perplexity`` is transformers' perplexity of the same model (a pico GGUF, f32), and
  ``llamacpp.gguf_continuations`` are llama.cpp's greedy tokens cut at the first special token;
- the held-out records in ``bench/results/heldout/gguf/`` name a finished measurement, and the margin
  check that compares a re-measurement with them (bench/heldout.py's 95 % binomial margin on each toxic
  count per prompt file, the perplexity ratio within 1 %) flags a figure outside it.

The held-out GGUF figures themselves are re-measured by ``bench/gguf_detox.py MODEL heldout`` (about
15 minutes of llama.cpp for both models on 2 cores), not in CI: that would take CI past its limit
(bench/results/gguf.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from actmerge import gguf_export, llamacpp

from .common import bench_module, load, random_ids
from .test_llamacpp import needs_llamacpp, pico

ROOT = Path(__file__).resolve().parent.parent


class IdTokenizer:
    """The part of a tokenizer ``gguf_continuations`` uses, over bare token ids (2 is EOS)."""

    all_special_ids = [2]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


@needs_llamacpp
def test_gguf_perplexity_and_continuations_are_llamacpps(tmp_path):
    base = pico("llama", tmp_path / "base")
    exp = gguf_export.export_gguf(base, tmp_path / "base.gguf", log=lambda *_: None)
    ids = [[1, *row] for row in random_ids(5, 10, seed=3).tolist()]
    model = load(base)
    with torch.no_grad():
        nll = count = 0.0
        for seq in ids:
            lp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0, :-1].double(), -1)
            nll -= float(lp.gather(-1, torch.tensor(seq[1:]).unsqueeze(-1)).sum())
            count += len(seq) - 1
    got = llamacpp.gguf_perplexity(exp.out, ids, chunk=2)  # chunks: the sum runs over all texts
    assert got == pytest.approx(math.exp(nll / count), rel=1e-4)
    runs = llamacpp.run_llamacpp(exp.out, ids, 6)
    texts = llamacpp.gguf_continuations(exp.out, IdTokenizer(), ids, 6, chunk=2)
    for run, text in zip(runs, texts, strict=True):
        toks = run["tokens"]
        kept = toks[: toks.index(2)] if 2 in toks else toks
        assert text == " ".join(map(str, kept))


# The held-out records (bench/results/gguf.md): measured once, after the choice; re-measured here
RECORDS = ROOT / "bench" / "results" / "heldout" / "gguf"
RECORD_FILES = sorted(RECORDS.glob("*.json"))


def outside_record(new: dict, old: dict, rows: int = 2) -> list[str]:
    """Where a re-measurement of the first ``rows`` files of a record leaves its noise margins
    (``bench/heldout.py``'s: each toxic count per prompt file within ``count_margin``, the perplexity
    ratio within ``PPL_MARGIN``)."""
    heldout = bench_module("heldout")
    bad = []
    for i, (o, n) in enumerate(zip(old["rows"][:rows], new["rows"][:rows], strict=True)):
        for name, count in old["n_prompts_per_file"].items():
            k_old, k_new = o["toxic_per_file"][name], n["toxic_per_file"][name]
            m = heldout.count_margin(count, k_old / count)
            if abs(k_new - k_old) > m:
                bad.append(f"row {i} {name}: {k_new}/{count} toxic vs recorded {k_old}/{count} (±{m})")
        if i and abs(n["perplexity_ratio"] / o["perplexity_ratio"] - 1) > heldout.PPL_MARGIN:
            bad.append(f"row {i} perplexity ×{n['perplexity_ratio']:.4f} vs ×{o['perplexity_ratio']:.4f}")
    return bad


def test_heldout_records_name_their_measurement():
    """Every record the slow test re-measures is a finished held-out run of bench/gguf_detox.py on a
    clean tree (PROTOCOL.md rule 5), with its counts per prompt file; there is at least one."""
    assert RECORD_FILES
    for path in RECORD_FILES:
        rec = json.loads(path.read_text())
        assert rec["split"] == "heldout" and rec["complete"] and rec["tree_clean"], path.name
        assert rec["command"].startswith("python bench/gguf_detox.py " + rec["model"] + " heldout "), (
            path.name
        )
        assert rec["date"] and len(rec["commit"]) == 40 and rec["note"], path.name
        assert sum(rec["n_prompts_per_file"].values()) == rec["n_prompts"] == 333, path.name
        for row in rec["rows"]:
            assert sum(row["toxic_per_file"].values()) == row["toxic"], path.name


def test_outside_record_flags_a_count_outside_its_margin():
    """The check itself: one count inside the margin holds, one outside fails."""
    heldout = bench_module("heldout")
    row = {"toxic_per_file": {"a.txt": 20, "b.txt": 40}, "perplexity_ratio": 1.05}
    old = {"n_prompts_per_file": {"a.txt": 100, "b.txt": 200}, "rows": [row, row]}
    m = heldout.count_margin(200, 40 / 200)
    inside = {"rows": [row, {**row, "toxic_per_file": {"a.txt": 20, "b.txt": 40 + m}}]}
    assert outside_record(inside, old) == []
    outside = {"rows": [row, {**row, "toxic_per_file": {"a.txt": 20, "b.txt": 40 + m + 1}}]}
    assert outside_record(outside, old) == [f"row 1 b.txt: {41 + m}/200 toxic vs recorded 40/200 (±{m})"]
    ppl = {"rows": [row, {**row, "perplexity_ratio": 1.05 * 1.02}]}
    assert outside_record(ppl, old)
