"""What actmerge wrote, and where it never writes.

A directory actmerge wrote holds ``actmerge/bake.json`` (a checkpoint) or ``actmerge/output.json``
(an eval or tune report); a file carries its marker inside: a maps file's safetensors metadata
(``format: actmerge-maps/…``), a GGUF's ``actmerge.version`` key (export-gguf, control vectors).
``--force`` replaces only these. Model caches are never an output: actmerge's own cache
(``ACTMERGE_CACHE``, default ``~/.cache/actmerge``; written only by actmerge's cache code) and the
Hugging Face caches (``HF_HOME``, ``HF_HUB_CACHE``, ``~/.cache/huggingface``).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from .. import __version__

PROVENANCE_DIR = "actmerge"
MARKER = f"{PROVENANCE_DIR}/bake.json"  # present in every checkpoint actmerge writes
REPORT_MARKER = f"{PROVENANCE_DIR}/output.json"  # present in every report directory actmerge writes
GGUF_KEY = "actmerge.version"  # in every GGUF actmerge writes


def cache_dir() -> Path:
    """actmerge's cache: converted built-in models, llama.cpp's converter, tuning records."""
    return Path(os.environ.get("ACTMERGE_CACHE") or Path.home() / ".cache" / "actmerge").expanduser()


def hf_caches() -> list[Path]:
    """The Hugging Face cache roots (models, datasets, the token) this environment uses."""
    env = os.environ
    xdg = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    home = Path(env.get("HF_HOME") or xdg / "huggingface")
    roots = [home, Path.home() / ".cache" / "huggingface"]
    roots += [
        Path(env[k]) for k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE") if env.get(k)
    ]
    return [r.expanduser() for r in roots]


def protected_roots(*, cache_write: bool = False) -> list[tuple[Path, str]]:
    """(root, what it is) of every place no output may be in, or hold. ``cache_write``: a write of
    actmerge's own cache code, which may go into actmerge's cache."""
    roots = [] if cache_write else [(cache_dir(), "actmerge's model cache (ACTMERGE_CACHE)")]
    return roots + [(r, "a Hugging Face cache") for r in hf_caches()]


def is_actmerge_output(path: Path) -> bool:
    """A directory actmerge wrote (a checkpoint or a report), not a link to one."""
    path = Path(path)
    return not path.is_symlink() and any((path / m).is_file() for m in (MARKER, REPORT_MARKER))


def report_marker(kind: str) -> bytes:
    """The contents of ``actmerge/output.json`` for a report directory of ``kind`` ("eval", "tune")."""
    return (
        json.dumps({"written_by": "actmerge", "kind": kind, "version": __version__}, indent=2) + "\n"
    ).encode()


def is_actmerge_file(path: Path) -> bool:
    """A regular file (not a link) carrying actmerge's marker: a maps file, or a GGUF actmerge wrote."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if head[:4] == b"GGUF":
                return _gguf_marked(path)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
            if not 2 <= n <= 100_000_000:
                return False
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and str(meta.get("format", "")).startswith("actmerge-")


def _gguf_marked(path: Path) -> bool:
    try:
        from gguf import GGUFReader

        return GGUF_KEY in GGUFReader(str(path)).fields
    except Exception:  # gguf raises plain ValueError/struct errors on foreign or broken files
        return False
