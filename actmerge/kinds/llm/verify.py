"""Verification: the hooked base model vs the baked checkpoint reloaded by plain transformers in a
fresh process that never imports actmerge. Two independent implementations of one map."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ...errors import VerificationError
from ...maps import MapSet
from ...placement import Placement, input_device
from ...tolerance import HALF_DTYPES, LOGITS, for_dtypes
from .hooks import steer

DEFAULT_PROMPTS = [
    "The weather in the mountains changed quickly that afternoon, and",
    "My neighbour told me that the new restaurant downtown",
    "In 1905, the young physicist published a paper on",
    "You are such an idiot, I can't believe you",
    "The recipe calls for two cups of flour and",
    "Honestly, the referee in last night's game was",
]
NEW_TOKENS = 16

# Runs in a fresh interpreter: plain transformers, no actmerge, no tokenizer. It loads the checkpoint
# at once (while the parent runs the hooked model), then waits for one line on stdin naming the token
# ids (``input_ids``, ``attention_mask``, ``positions`` to keep) and where to write the logits there.
# float32 for any checkpoint dtype, as the hooked base (``models.load_model``): a bf16/fp16 checkpoint
# is then compared for the rounding of its folded weights only (``tolerance.LOGITS`` says why).
# ``argv[2]``: JSON of the placement's ``from_pretrained`` arguments (device map, memory budget, offload).
_FRESH = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
kwargs = json.loads(sys.argv[2])
if "max_memory" in kwargs:  # JSON made the GPU indices strings
    kwargs["max_memory"] = {int(k) if k.isdigit() else k: v for k, v in kwargs["max_memory"].items()}
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, **kwargs).eval()
print("loaded", flush=True)
line = sys.stdin.readline().strip()
if not line:
    sys.exit(0)
in_path, out_path = line.split("\t")
batch = torch.load(in_path)
with torch.no_grad():
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
assert not any(m == "actmerge" or m.startswith("actmerge.") for m in sys.modules), "actmerge was imported"
torch.save({"logits": logits.cpu()[batch["positions"]].float()}, out_path)
print("done", flush=True)
"""


@dataclass(frozen=True)
class VerifyReport:
    max_abs_logit_diff: float
    max_abs_logit: float
    argmax_agreement: float  # over all real positions
    greedy_agreement: float  # at the positions whose top-1 is a greedy token (teacher forced)
    tolerance: float
    passed: bool
    n_prompts: int
    n_positions: int = 0  # the positions compared (prompt tokens, and greedy tokens where teacher forced)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


class FreshProcess:
    """The baked checkpoint loaded by plain transformers in a subprocess, started at once so that its
    start-up and load overlap with the caller's work; ``logits`` sends it one batch of token ids."""

    def __init__(self, checkpoint: Path, load_kwargs: dict | None = None):
        self.checkpoint = Path(checkpoint)
        # token ids and logits travel through files: in memory (/dev/shm) where there is one
        shm = Path("/dev/shm")
        self._dir = tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None)
        env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _FRESH, str(self.checkpoint.resolve()), json.dumps(load_kwargs or {})],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=self._dir.name,
        )

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The checkpoint's logits ``[N, V]`` at ``batch["positions"]`` of one forward of the batch."""
        d = Path(self._dir.name)
        torch.save(batch, d / "in.pt")
        try:
            out, err = self._proc.communicate(f"{d / 'in.pt'}\t{d / 'out.pt'}\n")
        except BrokenPipeError:  # it failed while loading
            out, err = self._proc.communicate()
        if self._proc.returncode != 0 or not (d / "out.pt").is_file():
            raise VerificationError(
                f"plain transformers could not load/run {self.checkpoint}:\n{err[-3000:]}"
            )
        return torch.load(d / "out.pt")["logits"]

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._dir.cleanup()

    def __enter__(self) -> FreshProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_fresh(checkpoint: Path, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of ``checkpoint`` at ``batch["positions"]`` from a subprocess with plain transformers."""
    with FreshProcess(checkpoint) as fresh:
        return fresh.logits(batch)


@torch.no_grad()
def reference(
    model, tok, prompts: list[str], maps: MapSet, strength: float, new_tokens: int = 0
) -> dict[str, torch.Tensor]:
    """The hooked model's logits over ``prompts`` (and over its greedy continuations of them when
    ``new_tokens`` > 0: each decoding step reads the whole LM head, so they cost).

    Returns the token ids and attention mask of the whole sequences (left-padded prompts; generated
    tokens after an end-of-sequence are masked), ``positions`` (the real tokens, whose logits are
    compared), ``greedy`` (the positions whose top-1 is a greedy token: each prompt's last one and
    the continuation) and ``logits`` at ``positions``."""
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    device = input_device(model)
    n = enc["input_ids"].shape[1]
    seq, mask = enc["input_ids"], enc["attention_mask"]
    with steer(model, maps, strength):
        if new_tokens > 0:
            seq = model.generate(
                **{k: v.to(device) for k, v in enc.items()},
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                top_k=None,
                top_p=None,
            ).cpu()
            eos = model.generation_config.eos_token_id
            eos = torch.tensor(
                eos if isinstance(eos, list) else [] if eos is None else [eos], dtype=torch.long
            )
            is_eos = torch.isin(seq[:, n:], eos).long()
            alive = (is_eos.cumsum(1) - is_eos == 0).long()  # up to and including the first EOS
            mask = torch.cat([mask, alive], 1)
        logits = model(input_ids=seq.to(device), attention_mask=mask.to(device)).logits
    positions = mask.bool()
    greedy = torch.zeros_like(positions)
    greedy[:, n - 1 :] = positions[:, n - 1 :]
    return {
        "input_ids": seq,
        "attention_mask": mask,
        "positions": positions,
        "greedy": greedy[positions],
        "logits": logits[positions.to(logits.device)].float().cpu(),
    }


def check(ref: dict[str, torch.Tensor], logits: torch.Tensor, tolerance: float) -> VerifyReport:
    """Compare the reference's logits with another model's at the same positions of the same tokens:
    max |Δlogit| and top-1 agreement over every real position, and top-1 agreement (teacher forced)
    at the positions whose top-1 is a greedy token of the hooked model."""
    a = ref["logits"]
    diff = float((a - logits).abs().max())
    same = a.argmax(-1) == logits.argmax(-1)
    gen = ref["greedy"]
    agree = float(same.float().mean())
    greedy = float(same[gen].float().mean()) if gen.any() else 1.0
    return VerifyReport(
        diff,
        float(a.abs().max()),
        agree,
        greedy,
        tolerance,
        diff <= tolerance,
        int(ref["input_ids"].shape[0]),
        int(a.shape[0]),
    )


def verify_transformers(
    checkpoint: Path,
    load_base: Callable[[], tuple],
    maps: MapSet,
    strength: float,
    prompts: list[str],
    tolerance: float,
    log: Callable[[str], None] = print,
    new_tokens: int = 0,
    placement: Placement | None = None,
    release: Callable[[], None] | None = None,
) -> VerifyReport:
    """The hooked base model (``load_base()``: model, tokenizer) vs ``checkpoint`` in a fresh process.

    The fresh process starts first and loads the checkpoint (weights only: it gets token ids, so no
    tokenizer) while this one loads (or reuses) the base model and runs the hooked forward of the
    fixed ``prompts``; then the fresh process runs one forward of the same tokens. Greedy agreement is
    teacher forced: the top-1 at each prompt's last position (its first greedy token), and with
    ``new_tokens`` > 0 along the hooked model's greedy continuation (generated here, never there).

    ``placement`` with a device map or memory budget (a model beyond RAM): one model at a time — the
    hooked base runs under it, ``release()`` frees it, then the fresh process loads the checkpoint under
    the same placement (its layers beyond the budget read from disk as they run)."""
    t0 = time.perf_counter()

    def step(what: str) -> None:
        log(f"verify: {what} ({time.perf_counter() - t0:.1f}s)")

    if placement is not None and placement.dispatched:
        model, tok = load_base()
        step(f"base model ready under {placement.to_dict()}; hooked forward of {len(prompts)} prompts …")
        ref = reference(model, tok, prompts, maps, strength, new_tokens)
        del model, tok
        if release is not None:
            release()
        gc.collect()
        step(f"base freed; loading {checkpoint} in a fresh process under the same placement …")
        with FreshProcess(checkpoint, placement.kwargs()) as fresh:
            logits = fresh.logits({k: ref[k] for k in ("input_ids", "attention_mask", "positions")})
        report = check(ref, logits, tolerance)
        step(f"compared: max |Δlogit| {report.max_abs_logit_diff:.3g}")
        return report

    log(f"verify: loading {checkpoint} in a fresh process (plain transformers) …")
    with FreshProcess(checkpoint) as fresh:
        model, tok = load_base()
        step(f"base model ready; hooked forward of {len(prompts)} prompts …")
        ref = reference(model, tok, prompts, maps, strength, new_tokens)
        step("hooked forward done; forward of the checkpoint in the fresh process …")
        logits = fresh.logits({k: ref[k] for k in ("input_ids", "attention_mask", "positions")})
    report = check(ref, logits, tolerance)
    step(f"compared: max |Δlogit| {report.max_abs_logit_diff:.3g}")
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
        diff, float(a.abs().max()), agree, greedy, tolerance, diff <= tolerance, int(mask.shape[0]), len(a)
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
    (or ``verify-llama.cpp.json``) with a digest of the weights it verified. Tolerance by the
    checkpoint's dtype (``tolerance.LOGITS``); a bf16/fp16 checkpoint is compared over the prompts'
    greedy continuations too (teacher forced), both sides computed in float32."""
    from ...io.provenance import write_verify_report
    from ...io.st_format import tensor_index
    from ...memory import check_budget
    from ...models import ModelSource
    from ...placement import parse_max_memory

    prompts = prompts or DEFAULT_PROMPTS
    step = log if progress else (lambda _msg: None)
    if runtime not in ("transformers", "llama.cpp"):
        raise VerificationError(f"--runtime {runtime!r}: choose transformers or llama.cpp.")
    if runtime == "llama.cpp":
        step(f"verify: loading the base model {loaded.source.name}")
        loaded.get()
        from ...llamacpp import verify_llamacpp

        step("verify: GGUF round trips of the base and the baked checkpoint (llama.cpp)")
        report = verify_llamacpp(
            checkpoint, loaded, maps, strength, prompts, outtype=outtype, tolerance=tolerance, log=log
        )
        write_verify_report(checkpoint, report.to_json(), runtime="llama.cpp")
        return report
    infos, _ = tensor_index(ModelSource("", checkpoint).safetensors_files())
    dtypes = {i.dtype for i in infos.values()}
    if tolerance is None:
        tolerance = for_dtypes(LOGITS, dtypes)
    # half precision: the top-1 agreement also counts NEW_TOKENS greedy tokens per prompt (teacher
    # forced), ~160 positions rather than ~60, where one near-tie flipped by the rounding costs < 1 %
    new_tokens = NEW_TOKENS if dtypes & set(HALF_DTYPES) else 0
    if loaded.placement.dispatched:  # before any load: a budget too small for one layer of either
        check_budget(loaded.source.path, parse_max_memory(loaded.placement.max_memory), loaded.source.name)
        check_budget(checkpoint, parse_max_memory(loaded.placement.max_memory), str(checkpoint))
    report = verify_transformers(
        checkpoint,
        loaded.get,
        maps,
        strength,
        prompts,
        tolerance,
        step,
        new_tokens=new_tokens,
        placement=loaded.placement,
        release=loaded.release,
    )
    write_verify_report(checkpoint, report.to_json())
    return report
