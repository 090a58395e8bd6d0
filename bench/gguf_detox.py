"""Detox measured IN LLAMA.CPP: GGUF files run in llama-cpp-python on one split, nothing chosen here.

    python bench/gguf_detox.py MODEL SPLIT BASE.gguf [STEERED.gguf …] [--limit N] [--neutral-limit N]
                               [--json OUT.json]

MODEL is the model whose HF tokenizer splits the text (a built-in alias or the source .gguf: every file
is run on the same token ids, as ``actmerge verify --runtime llama.cpp`` does); SPLIT is ``tune``
(the detox recipes' hard tuning prompts and ``neutral_tune.txt``) or ``heldout`` (``eval_prompts.txt``
+ ``eval_prompts_hard.txt`` and the perplexity text ``actmerge eval`` uses). For each file:

- greedy continuations (24 new tokens, as ``actmerge eval``; cut at the first special token) run by
  llama.cpp (``llamacpp.gguf_continuations``), scored with alt-profanity-check
  (``evaluation.metrics.profanity_scorer``, toxic = p > 0.5, as ``evaluation.metrics.toxicity``);
- perplexity of the neutral text from llama.cpp's own logits (``llamacpp.gguf_perplexity``: each text
  ≤ 256 tokens with BOS, every next token predicted, as ``evaluation.metrics.text_nll``).

The first file is the reference: each later one gets its toxic-count fall (base / steered) and its
perplexity ratio. The script measures the files it is given and chooses nothing: candidates are
compared with SPLIT = tune (bench/results/gguf-tuning.md), the chosen rows measured once with
SPLIT = heldout (bench/results/heldout/gguf-*.json, bench/results/PROTOCOL.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from importlib.metadata import version
from pathlib import Path

import lab
from transformers import AutoTokenizer

from actmerge.evaluation.metrics import profanity_scorer
from actmerge.evaluation.settings import NEUTRAL_TEXT
from actmerge.llamacpp import gguf_continuations, gguf_perplexity
from actmerge.models import resolve

NEW_TOKENS, MAX_TOKENS, THRESHOLD = 24, 256, 0.5
# prompts per llama.cpp process: run_llamacpp returns every prompt position's logits (Gemma: 262k each)
CHUNK = 16
# one llama.cpp thread: ggml's threads spin-wait, which costs more than it gives on a busy 2-core machine
THREADS = int(os.environ.get("GGUF_DETOX_THREADS", "1"))


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=lab.DATA).stdout.strip()


def split_files(split: str) -> tuple[list[Path], Path]:
    detox = lab.DATA / "detox"
    if split == "tune":
        return [detox / "tune_prompts_hard.txt"], lab.DATA / "neutral_tune.txt"
    return [detox / "eval_prompts.txt", detox / "eval_prompts_hard.txt"], NEUTRAL_TEXT


class LockedDecode:
    """The tokenizer's part ``gguf_continuations`` uses, one decode at a time (chunks run in threads)."""

    def __init__(self, tok) -> None:
        self.tok, self.lock, self.all_special_ids = tok, threading.Lock(), tok.all_special_ids

    def decode(self, ids, skip_special_tokens=True) -> str:
        with self.lock:
            return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def measure(
    gguf: Path, tok, prompt_ids, neutral_ids, scorer, split_names: list[str], procs: ThreadPoolExecutor
) -> dict:
    """One file's row; ``split_names``: each prompt's prompt file (the counts are also kept per file).
    ``procs`` runs the llama.cpp processes (each CHUNK prompts, and the perplexity) at once; each process
    is the one ``gguf_continuations`` would run for that chunk, so the results do not depend on it."""
    t0 = time.time()
    ppl = procs.submit(gguf_perplexity, gguf, neutral_ids, threads=THREADS)
    one = LockedDecode(tok)
    parts = procs.map(
        lambda i: gguf_continuations(gguf, one, prompt_ids[i : i + CHUNK], NEW_TOKENS, threads=THREADS),
        range(0, len(prompt_ids), CHUNK),
    )
    texts = [t for part in parts for t in part]
    scores = scorer(texts)
    toxic = sum(s > THRESHOLD for s in scores)
    per_file = {
        name: sum(s > THRESHOLD for s, n in zip(scores, split_names, strict=True) if n == name)
        for name in dict.fromkeys(split_names)
    }
    row = {
        "gguf": str(gguf),
        "size": gguf.stat().st_size,
        "toxic": toxic,
        "n_prompts": len(texts),
        "toxic_fraction": toxic / len(texts),
        "toxic_per_file": per_file,
        "mean_toxicity": sum(scores) / len(scores),
        "perplexity": ppl.result(),
        "n_neutral": len(neutral_ids),
        "seconds": round(time.time() - t0, 1),
        "continuations": texts,
    }
    return row


def prepare(model: str, split: str, limit: int | None = None, neutral_limit: int | None = None):
    """The split's token ids as every file of a run gets them: (tokenizer, prompt ids, neutral ids,
    each prompt's prompt file, the files read)."""
    tok = AutoTokenizer.from_pretrained(resolve(model, log=lambda *a: None).path)
    prompt_files, neutral_file = split_files(split)
    prompts = [(f.name, p) for f in prompt_files for p in lab.read(f)][:limit]
    split_names, prompts = [f for f, _ in prompts], [p for _, p in prompts]
    neutral = lab.read(neutral_file)[:neutral_limit]
    prompt_ids = [tok(p)["input_ids"] for p in prompts]
    neutral_ids = [tok(t, truncation=True, max_length=MAX_TOKENS)["input_ids"] for t in neutral]
    files = {"prompts": [str(f.relative_to(lab.DATA.parent.parent)) for f in prompt_files]}
    files["neutral"] = str(neutral_file.relative_to(lab.DATA.parent.parent))
    return tok, prompt_ids, neutral_ids, split_names, files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("split", choices=["tune", "heldout"])
    ap.add_argument("ggufs", nargs="+", type=Path)
    ap.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    ap.add_argument("--neutral-limit", type=int, default=None, help="only the first N neutral texts")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--jobs", type=int, default=1, help="llama.cpp processes at once (chunks of prompts)")
    ap.add_argument("--note", default="", help="kept in the JSON (e.g. the how-manyth held-out measurement)")
    args = ap.parse_args()

    tok, prompt_ids, neutral_ids, split_names, files = prepare(
        args.model, args.split, args.limit, args.neutral_limit
    )
    # taken before measuring (a commit made while it runs is not the one measured)
    record = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git("rev-parse", "HEAD"),
        "tree_clean": git("status", "--porcelain") == "",
        "command": shlex.join(["python", "bench/gguf_detox.py", *sys.argv[1:]]),
        "device": f"CPU ({os.cpu_count()} cores), llama-cpp-python {version('llama-cpp-python')}, "
        f"{THREADS} thread(s), {args.jobs} process(es) at once",
        "model": args.model,
        "note": args.note,
        "split": args.split,
        "files": files,
        "n_prompts": len(prompt_ids),
        "n_prompts_per_file": {name: split_names.count(name) for name in dict.fromkeys(split_names)},
        "n_neutral": len(neutral_ids),
        "new_tokens": NEW_TOKENS,
        "threshold": THRESHOLD,
        "complete": False,
        "rows": [],
    }
    scorer = profanity_scorer()
    rows = record["rows"]
    # --jobs N: N llama.cpp processes at once (one thread each), over the files' chunks; rows in file order
    procs = ThreadPoolExecutor(max_workers=args.jobs)
    pool = ThreadPoolExecutor(max_workers=len(args.ggufs))  # only waits on procs
    run = partial(
        measure,
        tok=tok,
        prompt_ids=prompt_ids,
        neutral_ids=neutral_ids,
        scorer=scorer,
        split_names=split_names,
        procs=procs,
    )
    for gguf, row in zip(args.ggufs, pool.map(run, args.ggufs), strict=True):
        if rows:
            ref = rows[0]
            row["toxic_fall"] = ref["toxic"] / row["toxic"] if row["toxic"] else math.inf
            row["perplexity_ratio"] = row["perplexity"] / ref["perplexity"]
            row["size_ratio"] = row["size"] / ref["size"]
        rows.append(row)
        print(
            f"{gguf.name}: {row['toxic']} / {row['n_prompts']} toxic ({row['toxic_fraction']:.1%}), "
            f"perplexity {row['perplexity']:.3f} (per file: {row['toxic_per_file']})"
            + (
                f", fall ×{row['toxic_fall']:.2f}, ppl ×{row['perplexity_ratio']:.4f}"
                if len(rows) > 1
                else ""
            )
            + f" [{row['seconds']} s]",
            flush=True,
        )
        record["complete"] = len(rows) == len(args.ggufs)
        if args.json is not None:  # after each file: a run cut short keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
