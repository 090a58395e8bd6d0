"""What fit, bake, verify and a LinEAS fit cost as the model grows: time and peak memory of each step,
each in its own process (peak RSS of it and its children), on the public API.

    python bench/synthetic.py /tmp/llama1b                       # Llama-3.2-1B shapes, random bf16
    python bench/scale.py gemma-3-270m /tmp/llama1b \
        [--steps 3] [--out bench/results/scale.md]

Per model, each step in its own process: ``load`` of the model as a fit loads it (float32); ``fit``
of Linear-AcT maps at every layer's attention context on 8 + 8 sentences; ``bake`` of them at λ = 1;
``verify`` of the bake under ``--max-memory`` of ``--budget-fraction`` (0.4) of the model's float32
size (at least 1.25 × its largest layer or embedding), with an offload folder (one model at a time,
layers beyond the budget on disk); two LinEAS fits of ``--steps`` steps — batch 4 at the attention
context (loading dominates), and detox.yaml's shape (its comments, three sites a layer, batch 32:
activations dominate) — each against the memory estimate it printed before loading. Prints the
table and writes it, with the date, commit and machine, to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = [
    "You are a worthless idiot and everyone hates you.",
    "Shut up, nobody cares what a moron like you thinks.",
    "This is the dumbest thing I have ever read, you fool.",
    "Get lost, you pathetic loser.",
    "What a stupid, useless answer from a clown.",
    "You disgusting liar, go away.",
    "Only an imbecile would write something this bad.",
    "I hate you and your garbage opinions.",
]
TARGET = [
    "Thank you for sharing, I see your point.",
    "I respectfully disagree, but I appreciate the answer.",
    "This was an interesting read, thanks for writing it.",
    "Could you explain that part a little more?",
    "I think we can find some common ground here.",
    "That is a fair question, let me think about it.",
    "I appreciate the effort you put into this.",
    "Let us talk about it calmly tomorrow.",
]
RECIPE = """name: scale-{method}
method: {method}
sites:
  - site: [attn_ctx]
    layers: all
source: src.txt
target: tgt.txt
max_tokens: 32
min_sentences: 8
batch_size: 4
lineas:
  steps: {steps}
  batch: 4
  lr: 0.01
"""
# detox.yaml's shape: its comments, three sites a layer, 32 sentences a step (activations dominate)
DETOX = """name: scale-detox
method: lineas
sites:
  - site: [attn_in, mlp_in, attn_ctx]
    layers: all
source: {data}/toxic.txt
target: {data}/nontoxic.txt
max_sentences: 256
max_tokens: 64
lineas:
  steps: {steps}
  batch: 32
  lr: 0.05
"""
# one step in a fresh interpreter: its wall time, and the peak RSS of it and of its children
STEP = r"""
import json, resource, sys, time
from pathlib import Path
from actmerge import pipeline
from actmerge.memory import peak_rss
from actmerge.options import BakeOptions, VerifyOptions
from actmerge.placement import Placement
what, model, work = sys.argv[1], sys.argv[2], Path(sys.argv[3])
lines = []
log = lambda m: (lines.append(str(m)), print(m, flush=True))
t0 = time.perf_counter()
if what == "load":
    model_, _ = pipeline.load(model, log=log).get()
    log(f"loaded {sum(p.numel() for p in model_.parameters())} parameters as {next(model_.parameters()).dtype}")
elif what == "fit":
    pipeline.fit(model, work / "linear_act.yaml", log=log).maps.save(work / "maps.safetensors", force=True)
elif what == "bake":
    pipeline.bake(model, maps=work / "maps.safetensors", options=BakeOptions(strengths=[1.0], out=work / "out", force=True), progress=False, log=log)
elif what == "verify":
    budget = Placement("cpu", max_memory=sys.argv[4], offload_folder=work / "offload")
    rep = pipeline.verify(work / "out", options=VerifyOptions(placement=budget), log=log)
    log(f"max |dlogit| {rep.max_abs_logit_diff:.3g} passed {rep.passed}")
elif what in ("lineas", "detox"):
    pipeline.fit(model, work / f"{what}.yaml", log=log, progress=False)
peak = max(peak_rss() // 1024, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t0, "peak": peak * 1024, "lines": lines}))
"""
GIB = 2**30
LINEAS = ("lineas", "detox")  # the steps that fit LinEAS, each printing its memory estimate
STEPS = ("load", "fit", "bake", "verify", *LINEAS)


def run_step(what: str, model: str, work: Path, *extra: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", STEP, what, model, str(work), *extra], capture_output=True, text=True
    )
    result = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or result is None:
        raise SystemExit(f"{what} on {model} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(result[len("RESULT ") :])


def measure(model: str, steps: int, fraction: float) -> dict:
    from actmerge.fitting import load
    from actmerge.memory import largest_block, parameter_count

    work = Path(tempfile.mkdtemp(prefix="scale-"))
    (work / "src.txt").write_text("\n".join(SOURCE))
    (work / "tgt.txt").write_text("\n".join(TARGET))
    for method in ("linear_act", "lineas"):
        (work / f"{method}.yaml").write_text(RECIPE.format(method=method, steps=steps))
    data = Path(__file__).resolve().parents[1] / "actmerge" / "recipes" / "data" / "detox"
    (work / "detox.yaml").write_text(DETOX.format(data=data, steps=steps))
    source = load(model, log=lambda *_: None).source
    fp32 = parameter_count(source.path, source.config) * 4
    # a fraction of the float32 model, but never less than its largest piece (Gemma's embedding is
    # 640 MiB of a 1.07 GB model: check_budget refuses a budget that holds no layer)
    floor = 1.25 * largest_block(source.path)
    budget = f"cpu={int(max(fraction * fp32, floor) / 2**20)}MiB"
    row = {"model": source.name, "params": fp32 // 4, "budget": budget}
    for what in STEPS:
        extra = (budget,) if what == "verify" else ()
        row[what] = run_step(what, model, work, *extra)
        print(
            f"{source.name} {what}: {row[what]['seconds']:.0f} s, peak {row[what]['peak'] / GIB:.2f} GiB",
            flush=True,
        )
    for what in LINEAS:  # the estimate the fit printed before loading
        row[what]["estimate_text"] = next(x for x in row[what]["lines"] if "memory estimate" in x)
        got = re.search(r"~([0-9.]+) GiB", row[what]["estimate_text"])
        row[what]["estimate"] = float(got.group(1)) * GIB
    return row


def table(rows: list[dict]) -> str:
    out = [
        "| model | params | load | fit (Linear-AcT) | bake | verify under budget | LinEAS fit, batch 4 "
        "(estimate: × peak) | LinEAS fit, detox.yaml's shape (estimate: × peak) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cell = {w: f"{r[w]['seconds']:.0f} s, {r[w]['peak'] / GIB:.2f} GiB" for w in STEPS}
        for w in LINEAS:
            est = r[w]["estimate"]
            cell[w] += f" ({est / GIB:.2f} GiB: {est / r[w]['peak']:.2f}×)"
        verdict = next((x for x in r["verify"]["lines"] if x.startswith("max |dlogit|")), "?")
        out.append(
            f"| {r['model']} | {r['params'] / 1e9:.2f} B | {cell['load']} | {cell['fit']} | {cell['bake']} | "
            f"{cell['verify']} ({r['budget']}; {verdict}) | {cell['lineas']} | {cell['detox']} |"
        )
    return "\n".join(out)


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    cpu = next(
        (
            x.split(":", 1)[1].strip()
            for x in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in x
        ),
        platform.processor(),
    )
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--budget-fraction", type=float, default=0.4)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scale.md")
    args = ap.parse_args()
    rows = [measure(m, args.steps, args.budget_fraction) for m in args.models]
    text = (
        table(rows)
        + "\n\n"
        + "\n".join(f"- {r['model']}, {w}: {r[w]['estimate_text']}" for r in rows for w in LINEAS)
    )
    print(text)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    args.out.write_text(
        f"# Scale: time and peak memory per step\n\n{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
        f"commit {commit}, {machine()}; `python bench/scale.py {' '.join(args.models)} --steps {args.steps}` "
        f"(each step its own process; peak RSS of it and its children; shared, loaded machine: times are "
        f"upper bounds).\n\n{text}\n"
    )


if __name__ == "__main__":
    main()
