"""Verification: the hooked base model vs the baked checkpoint reloaded by plain transformers in a
fresh process that never imports actmerge. Two independent implementations of one map."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import VerificationError
from .hooks import steer
from .maps import MapSet
from .placement import input_device
from .tolerance import LOGITS, for_dtypes

DEFAULT_PROMPTS = [
    "The weather in the mountains changed quickly that afternoon, and",
    "My neighbour told me that the new restaurant downtown",
    "In 1905, the young physicist published a paper on",
    "You are such an idiot, I can't believe you",
    "The recipe calls for two cups of flour and",
    "Honestly, the referee in last night's game was",
]
NEW_TOKENS = 16

# Runs in a fresh interpreter: plain transformers, no actmerge. Prints JSON with logits file path.
_FRESH = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, args_path, out_path = sys.argv[1], sys.argv[2], sys.argv[3]
args = json.load(open(args_path)); prompts, new_tokens = args["prompts"], args["new_tokens"]
tok = AutoTokenizer.from_pretrained(path); tok.padding_side = "left"
if tok.pad_token is None: tok.pad_token = tok.eos_token
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
enc = tok(prompts, return_tensors="pt", padding=True)
with torch.no_grad():
    logits = model(**enc).logits.float()
    gen = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id, top_k=None)
assert not any(m == "actmerge" or m.startswith("actmerge.") for m in sys.modules), "actmerge was imported"
torch.save({"logits": logits, "mask": enc["attention_mask"], "tokens": gen}, out_path)
print(json.dumps({"ok": True}))
"""


@dataclass(frozen=True)
class VerifyReport:
    max_abs_logit_diff: float
    max_abs_logit: float
    argmax_agreement: float  # over all real prompt positions
    greedy_agreement: float  # over the generated tokens
    tolerance: float
    passed: bool
    n_prompts: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def run_isolated(argv: list[str], payload: dict, what: str) -> dict:
    """Run ``python ARGV… ARGS.json OUT.pt`` in a fresh interpreter (offline, in a temp dir) and load
    what it saved: the baked model is loaded by plain transformers / diffusers there, never by
    actmerge. Shared by the language-model and the pipeline verification."""
    with tempfile.TemporaryDirectory() as d:
        apath, opath = Path(d) / "args.json", Path(d) / "out.pt"
        apath.write_text(json.dumps(payload))
        env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
        proc = subprocess.run(
            [sys.executable, *argv, str(apath), str(opath)], capture_output=True, text=True, env=env, cwd=d
        )
        if proc.returncode != 0:
            raise VerificationError(f"{what}:\n{proc.stderr[-3000:]}")
        return torch.load(opath)


def run_fresh(checkpoint: Path, prompts: list[str], new_tokens: int = NEW_TOKENS) -> dict:
    """Logits and greedy tokens of ``checkpoint`` from a subprocess with plain transformers."""
    path = str(Path(checkpoint).resolve())
    return run_isolated(
        ["-c", _FRESH, path],
        {"prompts": prompts, "new_tokens": new_tokens},
        f"plain transformers could not load/run {checkpoint}",
    )


def verify_checkpoint(
    checkpoint: Path,
    loaded,
    maps: MapSet,
    strength: float,
    *,
    tolerance: float | None = None,
    prompts: list[str] | None = None,
    runtime: str = "transformers",
    outtype: str = "f32",
    progress: bool = True,
    log=print,
):
    """Hooked base (``loaded``: a ``fitting.Loaded``) vs ``checkpoint``; writes ``actmerge/verify.json``
    (or ``verify-llama.cpp.json``) with a digest of the weights it verified."""
    from .io.provenance import write_verify_report
    from .io.safetensors import tensor_index
    from .models import ModelSource

    prompts = prompts or DEFAULT_PROMPTS
    step = log if progress else (lambda _msg: None)
    if runtime not in ("transformers", "llama.cpp"):
        raise VerificationError(f"--runtime {runtime!r}: choose transformers or llama.cpp.")
    step(f"verify 1/3: loading the base model {loaded.source.name}")
    model, tok = loaded.get()
    if runtime == "llama.cpp":
        from .llamacpp import verify_llamacpp

        step("verify 2/3: GGUF round trips of the base and the baked checkpoint (llama.cpp)")
        report = verify_llamacpp(
            checkpoint,
            model,
            loaded.source.path,
            tok,
            maps,
            strength,
            prompts,
            outtype=outtype,
            tolerance=tolerance,
            log=log,
        )
        write_verify_report(checkpoint, report.to_json(), runtime="llama.cpp")
        return report
    if tolerance is None:
        infos, _ = tensor_index(ModelSource("", checkpoint).safetensors_files())
        tolerance = for_dtypes(LOGITS, (i.dtype for i in infos.values()))
    step(f"verify 2/3: hooked base on {len(prompts)} prompts")
    ref = hooked_outputs(model, tok, prompts, maps, strength)
    step("verify 3/3: the baked checkpoint in a fresh process (plain transformers)")
    report = compare(ref, run_fresh(checkpoint, prompts), tolerance)
    write_verify_report(checkpoint, report.to_json())
    return report


@torch.no_grad()
def hooked_outputs(
    model, tok, prompts: list[str], maps: MapSet | None, strength: float, new_tokens: int = NEW_TOKENS
) -> dict:
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    if maps is None:
        maps = MapSet({})
    on_model = {k: v.to(input_device(model)) for k, v in enc.items()}
    with steer(model, maps, strength):
        logits = model(**on_model).logits.float().cpu()
        gen = model.generate(
            **on_model, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id, top_k=None
        ).cpu()
    return {"logits": logits, "mask": enc["attention_mask"], "tokens": gen}


def compare(reference: dict, other: dict, tolerance: float) -> VerifyReport:
    mask = reference["mask"].bool()
    a, b = reference["logits"][mask], other["logits"][mask]
    diff = float((a - b).abs().max())
    agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    n = reference["mask"].shape[1]
    ga, gb = reference["tokens"][:, n:], other["tokens"][:, n:]
    width = min(ga.shape[1], gb.shape[1])
    greedy = float((ga[:, :width] == gb[:, :width]).float().mean()) if width else 1.0
    return VerifyReport(
        diff, float(a.abs().max()), agree, greedy, tolerance, diff <= tolerance, int(mask.shape[0])
    )
