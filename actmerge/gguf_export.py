"""llama.cpp portability: GGUF export with llama.cpp's own converter, the llama.cpp round trip, and
control vectors for shifts that have no home in the weights (DESIGN.md §5).

No llama.cpp code ships with actmerge. ``convert_hf_to_gguf.py`` (with its ``conversion/`` package
and the matching ``gguf-py``) is taken from ``$ACTMERGE_LLAMA_CPP`` (a llama.cpp checkout) or
extracted once from the pinned ``llama-cpp-python`` sdist into ``<cache>/llama.cpp-<version>``.

Before converting, a temporary view of the checkpoint is built (symlinks; only shards that lose a
tensor are rewritten): bias tensors that the llama.cpp architecture does not load (``Linear.runtimes``
without "llama.cpp", e.g. Gemma 2/3 and Qwen3 ``o_proj``) are stripped when all zero, and refused
when not — llama.cpp rejects a GGUF with tensors it does not expect. The ``actmerge/`` provenance is
left out.

The round trip runs the GGUF in ``llama_cpp.Llama`` in a subprocess (a llama.cpp abort cannot take
actmerge down, and that process never imports actmerge) on token ids from the HF tokenizer, one
prompt at a time, and compares it with transformers — for the baked checkpoint (vs the hooked base)
and for the unbaked base (vs itself): the base's own round trip is the tolerance to beat.

Also here: Mistral in the Llama layout (``bake --as-llama``), where shifts fold into biases that
transformers, vLLM and llama.cpp all load.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from .checkpoint import INDEX, PROVENANCE_DIR, Shard, read_shard, tensor_index
from .errors import ActmergeError
from .models import ModelSource, cache_dir
from .sites import Architecture, architecture_for, num_layers

# The llama.cpp converter actmerge runs is the one vendored in this llama-cpp-python sdist (and the
# runtime the tests load GGUFs with): converter and runtime come from one llama.cpp commit.
LLAMA_CPP_PYTHON = "0.3.36"
SCRIPT = "convert_hf_to_gguf.py"
_VENDORED = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")  # under vendor/llama.cpp/
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# below this, a max |Δlogit| between two runtimes is float noise whatever the base round trip gave
FLOOR = 1e-3
# sites whose output is the last thing a decoder layer adds into the residual stream: a shift there
# equals llama.cpp's control vector for that layer (added to the layer output, ``l_out``)
LAYER_END_SITES = ("mlp_post", "mlp_out")


class ExportError(ActmergeError):
    """A checkpoint cannot be exported to (or run in) llama.cpp as asked."""

    exit_code = 7


# --- the converter ---------------------------------------------------------------------------


def converter_dir(log=print) -> Path:
    """Directory holding ``convert_hf_to_gguf.py``, ``conversion/`` and ``gguf-py/``."""
    env = os.environ.get("ACTMERGE_LLAMA_CPP")
    if env:
        root = Path(env).expanduser()
        if not (root / SCRIPT).is_file() or not (root / "gguf-py").is_dir():
            raise ExportError(
                f"ACTMERGE_LLAMA_CPP={env} is not a llama.cpp checkout (no {SCRIPT} and gguf-py/ there). "
                "Point it at a llama.cpp source tree, or unset it to let actmerge fetch the converter."
            )
        return root
    root = cache_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    if (root / SCRIPT).is_file() and (root / "gguf-py").is_dir():
        return root
    log(f"fetching llama.cpp's converter from the llama-cpp-python {LLAMA_CPP_PYTHON} sdist (once) …")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
                "-d",
                str(tmp / "sdist"),
            ],
            capture_output=True,
            text=True,
        )
        sdists = sorted((tmp / "sdist").glob("*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            raise ExportError(
                f"could not download the llama-cpp-python {LLAMA_CPP_PYTHON} sdist to get llama.cpp's "
                f"converter:\n{proc.stderr[-2000:]}\nCheck network access to PyPI, or set ACTMERGE_LLAMA_CPP "
                "to a llama.cpp checkout."
            )
        out = tmp / "llama.cpp"
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if len(parts) < 4 or parts[1:3] != ("vendor", "llama.cpp") or parts[3] not in _VENDORED:
                    continue
                member.name = str(Path(*parts[3:]))
                tar.extract(member, out, filter="data")
        if not (out / SCRIPT).is_file():
            raise ExportError(
                f"the llama-cpp-python {LLAMA_CPP_PYTHON} sdist has no vendor/llama.cpp/{SCRIPT}."
            )
        if root.exists():  # a concurrent fetch won
            return root
        out.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


# --- the checkpoint view the converter sees --------------------------------------------------


def rejected_biases(arch: Architecture, config: dict, tensors) -> list[str]:
    """Bias tensors present in the checkpoint that llama.cpp does not load for this architecture."""
    out = []
    for layer in range(num_layers(arch, config)):
        for lin in arch.linears.values():
            if "llama.cpp" in lin.runtimes:
                continue
            name = f"{arch.layer_module(layer, lin.module)}.bias"
            for ours, theirs in ((name, name), *arch.tensor_prefixes):
                cand = theirs + name[len(ours) :] if name.startswith(ours) else None
                if cand in tensors:
                    out.append(cand)
                    break
    return out


def prepare(checkpoint: Path, dest: Path) -> list[str]:
    """Fill ``dest`` with the view of ``checkpoint`` that llama.cpp's converter reads.

    Returns the stripped (all-zero) bias tensors; raises ``ExportError`` for a non-zero one."""
    checkpoint = Path(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    arch = architecture_for(config)
    files = ModelSource("", checkpoint).safetensors_files()
    infos, where = tensor_index(files)
    strip, nonzero = [], []
    for name in rejected_biases(arch, config, infos):
        with safe_open(str(where[name].path), framework="pt") as h:
            t = h.get_tensor(name)
        (nonzero if bool((t != 0).any()) else strip).append(name)
    if nonzero:
        shown = ", ".join(nonzero[:4]) + (f" (+{len(nonzero) - 4} more)" if len(nonzero) > 4 else "")
        raise ExportError(
            f"llama.cpp's {arch.name} architecture does not load these biases, and they are not zero: {shown}. "
            "A GGUF without them would not be the baked model. Re-bake with `--target llama.cpp` (the plan "
            "then keeps only biases llama.cpp loads, or refuses with the remedies), or choose other sites."
        )
    drop = set(strip)
    dest.mkdir(parents=True, exist_ok=True)
    by_file = {p.name: p for p in files}
    for p in sorted(checkpoint.iterdir()):
        if p.name.startswith(".") or p.name == PROVENANCE_DIR:
            continue
        if p.name in by_file and drop & set(read_shard(p).tensors()):
            _write_without(read_shard(p), drop, dest / p.name)
        elif p.name == INDEX and drop:
            data = json.loads(p.read_text())
            data["weight_map"] = {k: v for k, v in data["weight_map"].items() if k not in drop}
            (dest / p.name).write_text(json.dumps(data, indent=2) + "\n")
        else:
            (dest / p.name).symlink_to(p.resolve())
    return strip


def _write_without(shard: Shard, drop: set[str], dest: Path) -> None:
    """Copy a safetensors shard without the tensors in ``drop`` (byte ranges, nothing decoded)."""
    kept = sorted(
        ((n, m) for n, m in shard.tensors().items() if n not in drop), key=lambda x: x[1]["data_offsets"][0]
    )
    header: dict = {"__metadata__": shard.header["__metadata__"]} if "__metadata__" in shard.header else {}
    end = 0
    for name, meta in kept:
        size = meta["data_offsets"][1] - meta["data_offsets"][0]
        header[name] = {"dtype": meta["dtype"], "shape": meta["shape"], "data_offsets": [end, end + size]}
        end += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(shard.path, "rb") as src, open(dest, "wb") as dst:
        dst.write(struct.pack("<Q", len(raw)) + raw)
        for _name, meta in kept:
            src.seek(shard.data_start + meta["data_offsets"][0])
            left = meta["data_offsets"][1] - meta["data_offsets"][0]
            while left > 0:  # in blocks: an embedding can be GBs
                block = src.read(min(left, 16 << 20))
                if not block:
                    raise ExportError(f"{shard.path} is truncated: re-bake or re-download the checkpoint.")
                dst.write(block)
                left -= len(block)


@dataclass(frozen=True)
class ExportResult:
    out: Path
    outtype: str
    stripped: list[str]  # all-zero biases left out because llama.cpp does not load them
    seconds: float


def export_gguf(
    checkpoint: str | Path, out: str | Path, *, outtype: str = "f32", force: bool = False, log=print
) -> ExportResult:
    """Convert a (baked) checkpoint directory to one GGUF file with llama.cpp's converter."""
    t0 = time.perf_counter()
    checkpoint, out = Path(checkpoint).resolve(), Path(out).resolve()  # the converter runs elsewhere
    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}.")
    if not (checkpoint / "config.json").is_file():
        raise ExportError(f"{checkpoint} is not a Hugging Face checkpoint directory (no config.json).")
    if out.exists() and not force:
        raise ExportError(f"{out} exists: choose another -o or pass --force.")
    if importlib.util.find_spec("sentencepiece") is None:  # the converter imports it for every Llama/Gemma
        raise ExportError("llama.cpp's converter needs sentencepiece: `pip install sentencepiece`.")
    root = converter_dir(log=log)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".actmerge-gguf-", dir=out.parent) as d:
        view = Path(d) / "model"
        stripped = prepare(checkpoint, view)
        if stripped:
            log(
                f"left out {len(stripped)} all-zero bias tensors llama.cpp does not load (e.g. {stripped[0]})"
            )
        tmp_out = Path(d) / "model.gguf"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(root / "gguf-py"), os.environ.get("PYTHONPATH")])
            ),
            "HF_HUB_OFFLINE": "1",
        }
        env.pop("NO_LOCAL_GGUF", None)
        cmd = [sys.executable, str(root / SCRIPT), str(view), "--outfile", str(tmp_out), "--outtype", outtype]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=d)
        if proc.returncode != 0 or not tmp_out.is_file():
            raise ExportError(
                f"llama.cpp's converter ({root / SCRIPT}) failed on {checkpoint}:\n"
                f"{(proc.stderr or proc.stdout)[-3000:]}"
            )
        os.replace(tmp_out, out)
    return ExportResult(out, outtype, stripped, time.perf_counter() - t0)


# --- the llama.cpp round trip ----------------------------------------------------------------

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
) -> list[dict]:
    """Per prompt (token ids, no padding): prompt logits [n, V], the greedy continuation and, given the
    ``texts``, llama.cpp's own tokenization of them. ``cvec``: a control-vector GGUF to apply."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise ExportError(
            "llama-cpp-python is not installed: `pip install llama-cpp-python==" + LLAMA_CPP_PYTHON + "` "
            "(builds llama.cpp from source, a few minutes; CMAKE_BUILD_PARALLEL_LEVEL speeds it up)."
        ) from None
    with tempfile.TemporaryDirectory() as d:
        job, res = Path(d) / "job.json", Path(d) / "out.npz"
        threads = max(1, min(4, os.cpu_count() or 1))
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


@torch.no_grad()
def run_transformers(
    model, ids: list[list[int]], new_tokens: int, maps=None, strength: float = 1.0
) -> list[dict]:
    """The same per-prompt outputs from a transformers model (hooked with ``maps`` at ``strength``)."""
    from .hooks import steer
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

    # the VerifyReport-like view the CLI prints
    @property
    def max_abs_logit_diff(self) -> float:
        return self.baked.max_abs_logit_diff

    def to_json(self) -> str:
        return json.dumps({"runtime": "llama.cpp", **asdict(self)}, indent=2)


def verify_llamacpp(
    checkpoint: Path,
    base_model,
    base_dir: Path,
    tok,
    maps,
    strength: float,
    prompts: list[str],
    *,
    outtype: str = "f32",
    tolerance: float | None = None,
    new_tokens: int = 16,
    log=print,
) -> LlamaCppReport:
    """Export ``checkpoint`` and the unbaked base to GGUF and run both round trips."""
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


# --- control vectors -------------------------------------------------------------------------


@dataclass(frozen=True)
class ControlVector:
    directions: dict[int, torch.Tensor]  # llama.cpp layer il (≥ 1) → shift added to that layer's output
    from_sites: list[str]  # map keys whose shift is in the vector
    elsewhere: list[str]  # map keys with a shift that is not (it folds into the weights, or nowhere)


def control_vector(maps, config: dict, strength: float, *, partial: bool = False) -> ControlVector:
    """The shifts (λβ) of maps at layer-end sites, as llama.cpp control-vector directions.

    A shift at a layer-end site (Gemma's ``mlp_post``, the Llama-like ``mlp_out``) adds into the
    residual after the layer's last block: exactly what llama.cpp adds a control vector to. The scale of
    the same map still has to be baked (``bake --shift-policy drop``). Shifts elsewhere cannot be a
    control vector: an error unless ``partial`` (then reported in ``elsewhere``)."""
    from .fold import shift_home
    from .sites import site_for_key

    arch = architecture_for(config)
    n = num_layers(arch, config)
    dirs: dict[int, torch.Tensor] = {}
    used, elsewhere, bad = [], [], []
    for key, amap in maps.items():
        _, shift = amap.at(strength)
        if not bool((shift != 0).any()):
            continue
        site = site_for_key(arch, config, key)
        if site.name in LAYER_END_SITES and site.layer >= 1:
            dirs[site.layer] = dirs.get(site.layer, torch.zeros_like(shift)) + shift.float()
            used.append(key)
            continue
        folds, _, _, _ = shift_home(arch, config, site.name, targets=frozenset({"llama.cpp"}))
        elsewhere.append(key)
        if not folds:
            why = (
                "llama.cpp applies no control vector to layer 0's output"
                if site.name in LAYER_END_SITES
                else f"{site.name} is not the end of a layer (control vectors add to layer outputs)"
            )
            bad.append(f"  {key}: {why}")
    if bad and not partial:
        raise ExportError(
            "these shifts can neither fold into weights llama.cpp loads nor be a control vector:\n"
            + "\n".join(bad[:8])
            + ("\n  …" if len(bad) > 8 else "")
            + f"\nControl vectors hold shifts at {' / '.join(LAYER_END_SITES)} of layers 1..{n - 1}. "
            "Refit with shifts there (or scale-only), or pass --partial to export what can be expressed."
        )
    return ControlVector(dirs, used, elsewhere)


def write_control_vector(cv: ControlVector, out: Path, *, model_hint: str, n_layers: int) -> Path:
    """Write the GGUF llama.cpp's ``--control-vector`` reads: arch ``controlvector``, F32 ``direction.N``."""
    import gguf

    if not cv.directions:
        raise ExportError("no shift at a layer-end site: the control vector would be empty.")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), "controlvector")
    w.add_string("controlvector.model_hint", model_hint)
    w.add_int32("controlvector.layer_count", n_layers)
    for layer in sorted(cv.directions):  # llama.cpp: direction.N is added to the output of layer N
        w.add_tensor(f"direction.{layer}", cv.directions[layer].numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)
    return out


# --- the Llama layout (Mistral → LlamaForCausalLM) ----------------------------------------------

# config keys written over a Mistral config.json by `bake --as-llama` (the fold plan adds the bias flags)
LLAMA_LAYOUT_PATCH = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "sliding_window": None}


def as_llama_config(config: dict) -> dict:
    """A Mistral config in the Llama layout, where ``attention_bias``/``mlp_bias`` give shifts a home.

    Mistral is Llama plus a sliding window; transformers (and vLLM) drop biases a Mistral checkpoint
    carries, Llama loads them, and llama.cpp converts both to its ``llama`` architecture. The layouts
    compute the same function only while the window never binds: refused when ``sliding_window`` is
    set below ``max_position_embeddings``."""
    if config.get("model_type") != "mistral":
        raise ExportError(
            f"--as-llama converts Mistral checkpoints (model_type 'mistral'), not {config.get('model_type')!r}."
        )
    window, max_pos = config.get("sliding_window"), config.get("max_position_embeddings")
    if window is not None and (max_pos is None or window < max_pos):
        raise ExportError(
            f"sliding_window={window} < max_position_embeddings={max_pos}: Mistral attends to the last "
            f"{window} tokens only and Llama has no sliding window, so the Llama layout would compute "
            "another function on long inputs. --as-llama needs sliding_window null or ≥ the context."
        )
    out = {k: v for k, v in config.items() if k != "sliding_window"}
    out.update({k: v for k, v in LLAMA_LAYOUT_PATCH.items() if v is not None})
    out.setdefault("attention_bias", False)
    out.setdefault("mlp_bias", False)
    return out


@dataclass(frozen=True)
class LlamaLayout(ModelSource):
    """A Mistral source planned as Llama: fitting and hooks still load the checkpoint as it is."""

    @property
    def config(self) -> dict:
        return as_llama_config(json.loads((self.path / "config.json").read_text()))
