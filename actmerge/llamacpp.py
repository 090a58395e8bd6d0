"""The llama.cpp round trip (``actmerge verify --runtime llama.cpp``).

The GGUF runs in ``llama_cpp.Llama`` in a subprocess (a llama.cpp abort cannot take actmerge down,
and that process never imports actmerge) on token ids from the HF tokenizer, one prompt at a time,
and is compared with transformers — for the baked checkpoint (vs the hooked base) and for the
unbaked base (vs itself): the base's own round trip is the tolerance to beat.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ExportError
from .gguf_export import LLAMA_CPP_PYTHON, export_gguf

# below this, a max |Δlogit| between two runtimes is float noise whatever the base round trip gave
FLOOR = 1e-3

# Runs in a fresh interpreter with llama-cpp-python only (never actmerge).
_RUN = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
import llama_cpp
path, job_path, out_path = sys.argv[1:4]
job = json.load(open(job_path))
n_ctx = max(len(p) for p in job["ids"]) + job["new_tokens"] + 8
llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, verbose=False,
            n_threads=job["threads"], n_threads_batch=job["threads"])
if job.get("cvec"):
    import gguf
    r = gguf.GGUFReader(job["cvec"])
    n_embd = llm.n_embd()
    layers = llama_cpp.llama_model_n_layer(llm.model)
    data = np.zeros(n_embd * layers, dtype=np.float32)
    for t in r.tensors:  # as llama.cpp's common_control_vector_load: direction.N -> data[(N-1)*n_embd:]
        n = int(t.name.split(".")[1])
        data[(n - 1) * n_embd : n * n_embd] += np.asarray(t.data, dtype=np.float32)
    ptr = data.ctypes.data_as(llama_cpp.ctypes.POINTER(llama_cpp.ctypes.c_float))
    err = llama_cpp.llama_set_adapter_cvec(llm.ctx, ptr, data.size, n_embd, 1, layers)
    assert err == 0, f"llama_set_adapter_cvec failed: {err}"
out = {}
for i, ids in enumerate(job["ids"]):
    llm.reset()
    llm.eval(ids)
    out[f"logits_{i}"] = np.array(llm.scores[: len(ids)], dtype=np.float32)
    gen = []
    for _ in range(job["new_tokens"]):
        gen.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([gen[-1]])
    out[f"tokens_{i}"] = np.array(gen, dtype=np.int64)
    if job["texts"] is not None:
        out[f"tok_{i}"] = np.array(llm.tokenize(job["texts"][i].encode(), add_bos=True, special=False), dtype=np.int64)
assert not any(m == "actmerge" or m.startswith("actmerge.") for m in sys.modules), "actmerge was imported"
np.savez(out_path, **out)
"""


def run_llamacpp(
    gguf: Path,
    ids: list[list[int]],
    new_tokens: int,
    *,
    texts: list[str] | None = None,
    cvec: Path | None = None,
    threads: int | None = None,
) -> list[dict]:
    """Per prompt (token ids, no padding): prompt logits [n, V], the greedy continuation and, given the
    ``texts``, llama.cpp's own tokenization of them. ``cvec``: a control-vector GGUF to apply; ``threads``:
    llama.cpp's threads (default: the CPUs, at most 4; 1 is faster on a machine others keep busy)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise ExportError(
            "llama-cpp-python is not installed: `pip install llama-cpp-python==" + LLAMA_CPP_PYTHON + "` "
            "(builds llama.cpp from source, a few minutes; CMAKE_BUILD_PARALLEL_LEVEL speeds it up)."
        ) from None
    with tempfile.TemporaryDirectory() as d:
        job, res = Path(d) / "job.json", Path(d) / "out.npz"
        threads = threads or max(1, min(4, os.cpu_count() or 1))
        spec = {"ids": ids, "texts": texts, "new_tokens": new_tokens, "threads": threads}
        if cvec is not None:
            spec["cvec"] = str(Path(cvec).resolve())
        job.write_text(json.dumps(spec))
        proc = subprocess.run(
            [sys.executable, "-c", _RUN, str(Path(gguf).resolve()), str(job), str(res)],
            capture_output=True,
            text=True,
            cwd=d,
        )
        if proc.returncode != 0:
            raise ExportError(f"llama.cpp could not load/run {gguf}:\n{(proc.stderr or proc.stdout)[-3000:]}")
        npz = np.load(res)
        return [
            {
                "logits": torch.from_numpy(npz[f"logits_{i}"]),
                "tokens": npz[f"tokens_{i}"].tolist(),
                "tokenized": npz[f"tok_{i}"].tolist() if texts is not None else None,
            }
            for i in range(len(ids))
        ]


def gguf_continuations(
    gguf: Path, tok, ids: list[list[int]], new_tokens: int, *, chunk: int = 16, threads: int | None = None
) -> list[str]:
    """Greedy continuations of the prompts ``ids`` run by llama.cpp, cut at the first special token of
    the HF tokenizer ``tok`` (where transformers' generate stops) and decoded by it. ``chunk`` prompts per
    llama.cpp process (``run_llamacpp`` returns every prompt position's logits)."""
    special = set(tok.all_special_ids)
    out = []
    for i in range(0, len(ids), chunk):
        for run in run_llamacpp(gguf, ids[i : i + chunk], new_tokens, threads=threads):
            toks = run["tokens"]
            cut = next((j for j, t in enumerate(toks) if t in special), len(toks))
            out.append(tok.decode(toks[:cut], skip_special_tokens=True))
    return out


def gguf_perplexity(gguf: Path, ids: list[list[int]], *, chunk: int = 4, threads: int | None = None) -> float:
    """Perplexity of the texts ``ids`` (each with its BOS) from llama.cpp's own logits: every next token
    predicted, summed over all texts (as ``evaluation.metrics.perplexity``)."""
    nll = count = 0.0
    for i in range(0, len(ids), chunk):
        part = ids[i : i + chunk]
        for seq, run in zip(part, run_llamacpp(gguf, part, 0, threads=threads), strict=True):
            lp = torch.log_softmax(run["logits"][:-1].double(), -1)
            nll -= float(lp.gather(-1, torch.tensor(seq[1:]).unsqueeze(-1)).sum())
            count += len(seq) - 1
    return math.exp(nll / max(count, 1))


@torch.no_grad()
def run_transformers(
    model, ids: list[list[int]], new_tokens: int, maps=None, strength: float = 1.0
) -> list[dict]:
    """The same per-prompt outputs from a transformers model (hooked with ``maps`` at ``strength``)."""
    from .kinds.llm.hooks import steer
    from .maps import MapSet

    out = []
    device = next(model.parameters()).device
    with steer(model, maps if maps is not None else MapSet({}), strength):
        for seq in ids:
            x = torch.tensor([seq], device=device)
            logits = model(input_ids=x).logits[0].float()
            gen = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=new_tokens,
                do_sample=False,
                top_k=None,
                top_p=None,
                pad_token_id=model.config.pad_token_id,
            )
            out.append({"logits": logits.cpu(), "tokens": gen[0, len(seq) :].tolist()})
    return out


@dataclass(frozen=True)
class RoundTrip:
    """One model in transformers vs in llama.cpp, on identical token ids."""

    max_abs_logit_diff: float
    max_abs_logit: float
    argmax_agreement: float  # over all prompt positions
    greedy_agreement: float  # over the generated tokens, position by position
    tokenizer_agreement: float | None  # prompts llama.cpp's own tokenizer splits exactly like the HF one
    n_prompts: int


def compare_runs(ref: list[dict], got: list[dict], hf_ids: list[list[int]]) -> RoundTrip:
    diff = top = 0.0
    agree = positions = same = width_total = 0
    for r, g in zip(ref, got, strict=True):
        vocab = min(r["logits"].shape[-1], g["logits"].shape[-1])  # llama.cpp may drop padded rows
        a, b = r["logits"][:, :vocab], g["logits"][:, :vocab]
        diff = max(diff, float((a - b).abs().max()))
        top = max(top, float(a.abs().max()))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        positions += a.shape[0]
        width = min(len(r["tokens"]), len(g["tokens"]))
        same += sum(int(x == y) for x, y in zip(r["tokens"][:width], g["tokens"][:width], strict=True))
        width_total += width
    tok = None
    if all(g["tokenized"] is not None for g in got):
        tok = sum(g["tokenized"] == ids for g, ids in zip(got, hf_ids, strict=True)) / max(1, len(got))
    return RoundTrip(diff, top, agree / max(1, positions), same / max(1, width_total), tok, len(ref))


@dataclass(frozen=True)
class LlamaCppReport:
    """Baked checkpoint in llama.cpp vs the hooked base in transformers, next to the base's own round trip."""

    baked: RoundTrip
    base: RoundTrip
    outtype: str
    tolerance: float  # max(2 × the base round trip's max |Δlogit|, FLOOR) unless given
    passed: bool
    stripped: list[str]
    # a GGUF bake that re-quantised matrices: the same edits with those matrices in float32 vs the
    # hooked base (what ``passed`` judges), and the output vs that reference (the re-quantisation)
    exact: RoundTrip | None = None
    requantised: RoundTrip | None = None

    # the VerifyReport-like view the CLI prints
    @property
    def max_abs_logit_diff(self) -> float:
        return self.baked.max_abs_logit_diff

    def to_json(self) -> str:
        return json.dumps({"runtime": "llama.cpp", **asdict(self)}, indent=2)


def verify_llamacpp(
    checkpoint: Path,
    loaded,
    maps,
    strength: float,
    prompts: list[str],
    *,
    outtype: str = "f32",
    tolerance: float | None = None,
    new_tokens: int = 16,
    log=print,
) -> LlamaCppReport:
    """Export ``checkpoint`` and the unbaked base (``loaded``: a ``fitting.Loaded``) to GGUF and run
    both round trips."""
    base_model, tok = loaded.get()
    base_dir = loaded.source.path
    ids = [tok(p)["input_ids"] for p in prompts]
    with tempfile.TemporaryDirectory(prefix="actmerge-llamacpp-") as d:
        log(f"converting the baked checkpoint to GGUF ({outtype}) …")
        baked = export_gguf(checkpoint, Path(d) / "baked.gguf", outtype=outtype, log=log)
        log("running it in llama.cpp …")
        got_baked = run_llamacpp(baked.out, ids, new_tokens, texts=prompts)
        (Path(d) / "baked.gguf").unlink()
        log(f"converting the unbaked base ({base_dir}) to GGUF, the tolerance to beat …")
        export_gguf(base_dir, Path(d) / "base.gguf", outtype=outtype, log=log)
        got_base = run_llamacpp(Path(d) / "base.gguf", ids, new_tokens, texts=prompts)
    log("running transformers (hooked base and unhooked base) …")
    rt_baked = compare_runs(run_transformers(base_model, ids, new_tokens, maps, strength), got_baked, ids)
    rt_base = compare_runs(run_transformers(base_model, ids, new_tokens), got_base, ids)
    tol = tolerance if tolerance is not None else max(2 * rt_base.max_abs_logit_diff, FLOOR)
    return LlamaCppReport(
        rt_baked, rt_base, outtype, tol, rt_baked.max_abs_logit_diff <= tol, list(baked.stripped)
    )
