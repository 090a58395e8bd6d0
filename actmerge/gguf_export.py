"""llama.cpp portability: GGUF export with llama.cpp's own converter (docs/design.md §5).

The round trip lives in ``llamacpp.py``, control vectors in ``control_vector.py``, Mistral's Llama
layout in ``llama_layout.py``.

No llama.cpp code ships with actmerge. ``convert_hf_to_gguf.py`` (with its ``conversion/`` package
and the matching ``gguf-py``) is taken from ``$ACTMERGE_LLAMA_CPP`` (a llama.cpp checkout) or
extracted once from the pinned ``llama-cpp-python`` sdist into ``<cache>/llama.cpp-<version>``.

Before converting, a temporary view of the checkpoint is built (symlinks; only shards that lose a
tensor are rewritten): bias tensors that the llama.cpp architecture does not load (``Linear.runtimes``
without "llama.cpp", e.g. Gemma 2/3 and Qwen3 ``o_proj``) are stripped when all zero, and refused
when not — llama.cpp rejects a GGUF with tensors it does not expect. The ``actmerge/`` provenance is
left out.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from . import __version__
from .errors import ExportError
from .io.markers import GGUF_KEY
from .io.output import PROVENANCE_DIR, atomic_dir, atomic_file, check_output, scratch_dir
from .io.st_format import read_shard, tensor_index
from .io.st_rewrite import write_shard
from .io.tree import INDEX, read_config
from .models import ModelSource, cache_dir
from .naming import TensorNamer
from .sites import Architecture, architecture_for, num_layers

# The llama.cpp converter actmerge runs is the one vendored in this llama-cpp-python sdist (and the
# runtime the tests load GGUFs with): converter and runtime come from one llama.cpp commit.
LLAMA_CPP_PYTHON = "0.3.36"
SCRIPT = "convert_hf_to_gguf.py"
_VENDORED = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")  # under vendor/llama.cpp/
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# runs the converter (argv[1]) with actmerge's marker key in every GGUF it writes (what --force checks);
# the converter's folder (its sibling package conversion/) and gguf-py come from PYTHONPATH
_MARKED = f"""
import runpy, sys
import gguf
real = gguf.GGUFWriter.write_header_to_file
def marked(self, *a, **k):
    self.add_string({GGUF_KEY!r}, {__version__!r})
    return real(self, *a, **k)
gguf.GGUFWriter.write_header_to_file = marked
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


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
    with atomic_dir(root, force=True, owned=True, log=log) as tmp:
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
                str(tmp / ".sdist"),
            ],
            capture_output=True,
            text=True,
        )
        sdists = sorted((tmp / ".sdist").glob("*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            raise ExportError(
                f"could not download the llama-cpp-python {LLAMA_CPP_PYTHON} sdist to get llama.cpp's "
                f"converter:\n{proc.stderr[-2000:]}\nCheck network access to PyPI, or set ACTMERGE_LLAMA_CPP "
                "to a llama.cpp checkout."
            )
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if len(parts) < 4 or parts[1:3] != ("vendor", "llama.cpp") or parts[3] not in _VENDORED:
                    continue
                member.name = str(Path(*parts[3:]))
                tar.extract(member, tmp, filter="data")
        shutil.rmtree(tmp / ".sdist")
        if not (tmp / SCRIPT).is_file():
            raise ExportError(
                f"the llama-cpp-python {LLAMA_CPP_PYTHON} sdist has no vendor/llama.cpp/{SCRIPT}."
            )
    return root


# --- the checkpoint view the converter sees --------------------------------------------------


def rejected_biases(arch: Architecture, config: dict, tensors) -> list[str]:
    """Bias tensors present in the checkpoint that llama.cpp does not load for this architecture."""
    name_of = TensorNamer(tensors, arch.tensor_prefixes)
    out = []
    for layer in range(num_layers(arch, config)):
        for lin in arch.linears.values():
            if "llama.cpp" not in lin.runtimes and (
                found := name_of(f"{arch.layer_module(layer, lin.module)}.bias")
            ):
                out.append(found)
    return out


def prepare(checkpoint: Path, dest: Path) -> list[str]:
    """Fill ``dest`` with the view of ``checkpoint`` that llama.cpp's converter reads.

    Returns the stripped (all-zero) bias tensors; raises ``ExportError`` for a non-zero one."""
    checkpoint = Path(checkpoint)
    config = read_config(checkpoint / "config.json")
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
            write_shard(read_shard(p), {}, dest / p.name, drop=drop)
        elif p.name == INDEX and drop:
            data = json.loads(p.read_text())
            data["weight_map"] = {k: v for k, v in data["weight_map"].items() if k not in drop}
            (dest / p.name).write_text(json.dumps(data, indent=2) + "\n")
        else:
            (dest / p.name).symlink_to(p.resolve())
    return strip


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
    from .gguf_quantize import QUANT_OUTTYPES, quantize

    if outtype not in OUTTYPES and outtype not in QUANT_OUTTYPES:
        raise ExportError(f"--outtype {outtype!r}: choose one of {', '.join([*OUTTYPES, *QUANT_OUTTYPES])}.")
    if not (checkpoint / "config.json").is_file():
        raise ExportError(f"{checkpoint} is not a Hugging Face checkpoint directory (no config.json).")
    architecture_for(read_config(checkpoint / "config.json"))  # a clear error, before the converter
    check_output(out, checkpoint, force=force, is_dir=False)
    if importlib.util.find_spec("sentencepiece") is None:  # the converter imports it for every Llama/Gemma
        raise ExportError("llama.cpp's converter needs sentencepiece: `pip install sentencepiece`.")
    root = converter_dir(log=log)
    with atomic_file(out, force=force, source=checkpoint, log=log) as final, scratch_dir(out) as d:
        view = d / "model"
        stripped = prepare(checkpoint, view)
        if stripped:
            log(
                f"left out {len(stripped)} all-zero bias tensors llama.cpp does not load (e.g. {stripped[0]})"
            )
        tmp_out = d / "model.gguf"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(root), str(root / "gguf-py"), os.environ.get("PYTHONPATH")])
            ),
            "HF_HUB_OFFLINE": "1",
        }
        env.pop("NO_LOCAL_GGUF", None)
        convert = "f32" if outtype in QUANT_OUTTYPES else outtype  # then llama.cpp's quantiser
        cmd = [sys.executable, "-c", _MARKED, str(root / SCRIPT), str(view), "--outfile", str(tmp_out)]
        cmd += ["--outtype", convert]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=d)
        if proc.returncode != 0 or not tmp_out.is_file():
            raise ExportError(
                f"llama.cpp's converter ({root / SCRIPT}) failed on {checkpoint}:\n"
                f"{(proc.stderr or proc.stdout)[-3000:]}"
            )
        if outtype in QUANT_OUTTYPES:  # llama.cpp's quantiser keeps every key, the marker included
            quantize(tmp_out, Path(d) / "model.q.gguf", outtype)
            os.replace(Path(d) / "model.q.gguf", tmp_out)
        os.replace(tmp_out, final)
    return ExportResult(out, outtype, stripped, time.perf_counter() - t0)
