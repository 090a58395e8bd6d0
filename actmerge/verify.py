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

DEFAULT_PROMPTS = [
    "The weather in the mountains changed quickly that afternoon, and",
    "My neighbour told me that the new restaurant downtown",
    "In 1905, the young physicist published a paper on",
    "You are such an idiot, I can't believe you",
    "The recipe calls for two cups of flour and",
    "Honestly, the referee in last night's game was",
]
NEW_TOKENS = 16
# max |Δlogit| by checkpoint dtype (fp32: ~1e-6 relative on real models whose logits reach ~30)
TOLERANCE = {"F32": 1e-3, "F16": 0.25, "BF16": 0.5}

# Runs in a fresh interpreter: plain transformers, no actmerge. Prints JSON with logits file path.
_FRESH = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, prompts_path, out_path, new_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
prompts = json.load(open(prompts_path))
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


def run_fresh(checkpoint: Path, prompts: list[str], new_tokens: int = NEW_TOKENS) -> dict:
    """Logits and greedy tokens of ``checkpoint`` from a subprocess with plain transformers."""
    with tempfile.TemporaryDirectory() as d:
        pfile, ofile = Path(d) / "prompts.json", Path(d) / "out.pt"
        pfile.write_text(json.dumps(prompts))
        env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                _FRESH,
                str(Path(checkpoint).resolve()),
                str(pfile),
                str(ofile),
                str(new_tokens),
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=d,
        )
        if proc.returncode != 0:
            raise VerificationError(
                f"plain transformers could not load/run {checkpoint}:\n{proc.stderr[-3000:]}"
            )
        return torch.load(ofile)


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
