"""Bake I/O at scale: a synthetic sharded Llama checkpoint (Llama-3.2-3B shapes, random bf16 weights,
≥ 6 GiB in ≥ 3 shards, built once and cached), baked vs a plain copy of the same files.

    HF_HUB_OFFLINE=1 python bench/bake_io.py --scenario heavy --repeats 3
    HF_HUB_OFFLINE=1 python bench/bake_io.py --scenario norms --repeats 3

The first run writes the checkpoint to $ACTMERGE_CACHE/bench/synthetic-llama-3b (default
~/.cache/actmerge; ``--dir`` elsewhere): 6.4 GB, a few minutes, ~2 GiB of RAM (one shard at a time).
Each repeat also needs room for one copy and one bake beside it (another ~13 GB of disk). Run it on
an idle machine with a warm page cache (the first repeat warms it). On a shared machine the ratio is
load-sensitive (with every core busy it tracks the two CPU times; the bake uses two threads): take
``--repeats 5`` or more. ``bench/offload.py`` reuses the same checkpoint.

Prints, from one run (copies and bakes interleaved, medians): bake time / copy time (targets: heavy
≤ 1.3, norms ≤ 1.15) and peak RSS of the bake / largest shard (target ≤ largest shard + 1 GiB). The
bake (plan + ``write_checkpoint``) runs in a child process so its peak RSS is its own.
Scenarios: ``norms`` = scale-only maps at every norm (tiny edits); ``heavy`` = shifts at attn_in
(q,k,v,o biases appear via attention_bias, all in one shard whose header grows) + scales at mlp_hidden
(every down_proj weight, ~1.4 GB, is rewritten); ``append`` = the cost of appending a tensor to one
2 GiB file (a single-file checkpoint keeps added tensors inside it), page-aligned vs not, vs a copy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from actmerge.models import cache_dir

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 28,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
    "dtype": "bfloat16",
    "rope_theta": 500000.0,
}
SHARD_BYTES = 2 * 2**30


def build(path: Path, config: dict = CONFIG, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write the synthetic checkpoint shard by shard (never the whole model in memory)."""
    if (path / "model.safetensors.index.json").is_file():
        return path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    c = config
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["head_dim"]
    shapes = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    shapes.append(("model.norm.weight", (h,)))
    groups, cur, size = [], [], 0
    for name, shape in shapes:
        n = 2 * torch.Size(shape).numel()
        if cur and size + n > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    groups.append(cur)
    weight_map, total = {}, 0
    g = torch.Generator().manual_seed(0)
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            t = torch.empty(shape, dtype=torch.bfloat16)
            t.uniform_(-0.02, 0.02, generator=g) if len(shape) > 1 else t.fill_(1.0)
            tensors[name] = t
            weight_map[name] = fname
            total += 2 * t.numel()
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
        print(f"  wrote {fname}", flush=True)
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(path)
    return path


CHILD = r"""
import sys, time, json, torch
from actmerge.memory import peak_rss
from pathlib import Path
from actmerge.pipeline import plan as make_plan
from actmerge.io.tree import write_checkpoint
from actmerge.maps import AffineMap, MapSet
from actmerge.models import ModelSource
src = ModelSource("synthetic-llama-3b", Path(sys.argv[1]))
out, scenario = Path(sys.argv[2]), sys.argv[3]
cfg = src.config
g = torch.Generator().manual_seed(0)
maps = {}
for n in range(cfg["num_hidden_layers"]):
    h = cfg["hidden_size"]
    if scenario == "norms":
        for norm in ("input_layernorm", "post_attention_layernorm"):
            maps[f"model.layers.{n}.{norm}:output"] = AffineMap(1 + 0.1 * torch.randn(h, generator=g), torch.zeros(h))
    else:
        maps[f"model.layers.{n}.input_layernorm:output"] = AffineMap(1 + 0.1 * torch.randn(h, generator=g), 0.1 * torch.randn(h, generator=g))
        i = cfg["intermediate_size"]
        maps[f"model.layers.{n}.mlp.down_proj:input"] = AffineMap(1 + 0.1 * torch.randn(i, generator=g), torch.zeros(i))
ms = MapSet(maps, base_model="synthetic", method="random")
t0 = time.perf_counter()
plan = make_plan(src, ms, 1.0)
write_checkpoint(src.path, src.safetensors_files(), plan.weight_edits(), out, config_patch=plan.config_patch, log=lambda *_: None)
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "peak_rss": peak_rss()}))
"""

APPEND = r"""
import sys, time, json, torch
from pathlib import Path
from actmerge.io import st_format, st_rewrite
shard = st_format.read_shard(Path(sys.argv[1]))
out, how = Path(sys.argv[2]), sys.argv[3]
bias = {"model.extra.bias": torch.zeros(3072, dtype=torch.bfloat16)}
t0 = time.perf_counter()
if how == "aligned":
    st_rewrite.write_shard(shard, bias, out)
else:  # the data section moved by a few bytes (the header padded to 8 only): unaligned copies
    real = st_rewrite.encode_header  # write_shard's own name for it
    st_rewrite.encode_header = lambda header, data_start_mod=None: real(header)
    st_rewrite.write_shard(shard, bias, out)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def _child(code: str, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if proc.returncode:
        sys.exit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _copy(files: list[Path], dest: Path) -> float:
    dest.mkdir()
    t0 = time.perf_counter()
    for f in files:
        shutil.copyfile(f, dest / f.name)
    dt = time.perf_counter() - t0
    shutil.rmtree(dest)
    return dt


def append_cost(files: list[Path], scratch: Path, repeats: int) -> None:
    """A single-file checkpoint keeps its added tensors inside the file (transformers loads
    model.safetensors directly when it exists): the header grows and the data section moves. Time of
    that rewrite on the largest shard, page-aligned (what the writer does) and 8-byte aligned (the
    old writer), vs a plain copy of the file; interleaved."""
    big = max(files, key=lambda f: f.stat().st_size)
    times: dict[str, list[float]] = {"copy": [], "aligned": [], "unaligned": []}
    for r in range(repeats):
        times["copy"].append(_copy([big], scratch / f"c{r}"))
        for how in ("aligned", "unaligned"):
            out = scratch / f"{how}{r}.safetensors"
            times[how].append(_child(APPEND, str(big), str(out), how)["seconds"])
            out.unlink()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"append to one {big.stat().st_size / 2**30:.2f} GiB file, medians of {repeats} interleaved runs:")
    for k, v in times.items():
        print(f"  {k:9s} {med[k]:.2f}s  ({', '.join(f'{x:.2f}' for x in v)})")
    print(
        f"ratio aligned / copy = {med['aligned'] / med['copy']:.2f}; "
        f"unaligned / copy = {med['unaligned'] / med['copy']:.2f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scenario", choices=["norms", "heavy", "append"], default="heavy")
    ap.add_argument("--dir", default=str(cache_dir() / "bench" / "synthetic-llama-3b"))
    args = ap.parse_args()
    src = build(Path(args.dir))
    files = sorted(src.glob("*.safetensors"))
    sizes = [f.stat().st_size for f in files]
    print(
        f"checkpoint: {len(files)} shards, {sum(sizes) / 2**30:.2f} GiB, largest {max(sizes) / 2**30:.2f} GiB"
    )
    with tempfile.TemporaryDirectory(dir=src.parent) as scratch:
        scratch = Path(scratch)
        if args.scenario == "append":
            append_cost(files, scratch, args.repeats)
            return
        copies, bakes, rss = [], [], []
        for r in range(args.repeats):  # interleaved: copy, bake, copy, bake, ...
            copies.append(_copy(files, scratch / f"copy{r}"))
            out = scratch / f"bake{r}"
            res = _child(CHILD, str(src), str(out), args.scenario)
            bakes.append(res["seconds"])
            rss.append(res["peak_rss"])
            shutil.rmtree(out)
    c, b, peak = statistics.median(copies), statistics.median(bakes), max(rss)
    print(
        f"copies: {', '.join(f'{x:.2f}' for x in copies)} s; bakes: {', '.join(f'{x:.2f}' for x in bakes)} s"
    )
    target = 1.3 if args.scenario == "heavy" else 1.15
    print(f"scenario {args.scenario}: copy median {c:.2f}s, bake median {b:.2f}s over {args.repeats} runs")
    print(f"ratio bake / copy = {b / c:.2f} (target ≤ {target})")
    print(
        f"peak RSS of the bake {peak / 2**30:.2f} GiB vs largest shard {max(sizes) / 2**30:.2f} GiB: "
        f"ratio {peak / max(sizes):.2f}; excess {(peak - max(sizes)) / 2**30:+.2f} GiB (target ≤ +1 GiB)"
    )


if __name__ == "__main__":
    main()
