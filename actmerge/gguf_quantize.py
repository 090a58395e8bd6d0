"""``export-gguf --outtype q4_k_m|q5_k_m|q8_0…``: llama.cpp's own quantiser on the converter's f32 GGUF.

llama-cpp-python exposes ``llama_model_quantize``; it runs in a fresh interpreter (a llama.cpp abort
cannot take actmerge down), with llama.cpp's default parameters for the chosen file type."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .errors import ExportError

# --outtype → llama.cpp's LLAMA_FTYPE_MOSTLY_* name
QUANT_OUTTYPES = {
    t.lower(): f"LLAMA_FTYPE_MOSTLY_{t}"
    for t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M")
    + ("Q5_K_S", "Q5_K_M", "Q6_K")
}

_RUN = r"""
import sys, llama_cpp
src, dst, ftype = sys.argv[1:4]
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, ftype)
rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
sys.exit(1 if rc != 0 else 0)
"""


def quantize(src: Path, dst: Path, outtype: str) -> None:
    """Quantise the GGUF ``src`` (f32/f16) into ``dst`` with llama.cpp's quantiser."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise ExportError(
            f"--outtype {outtype} uses llama.cpp's quantiser from llama-cpp-python: "
            "`pip install llama-cpp-python`, or export f32/f16/q8_0."
        ) from None
    proc = subprocess.run(
        [sys.executable, "-c", _RUN, str(src), str(dst), QUANT_OUTTYPES[outtype]],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or not Path(dst).is_file():
        raise ExportError(
            f"llama.cpp's quantiser failed ({outtype}):\n{(proc.stderr or proc.stdout)[-2000:]}"
        )


def _ggml():
    """llama.cpp's ggml base library as llama-cpp-python ships it (``llama_cpp/lib``), with the row
    quantiser's signatures."""
    import ctypes

    import llama_cpp

    folder = Path(llama_cpp.__file__).parent / "lib"
    names = ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll")
    found = next((folder / n for n in names if (folder / n).is_file()), None)
    if found is None:
        raise OSError(f"no ggml-base library in {folder}")
    lib = ctypes.CDLL(str(found))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    lib.ggml_quantize_chunk.argtypes += [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def quantize_rows(arr, qtype):
    """``arr`` (float32, ``[rows, n]``) quantised to the GGML type ``qtype`` row by row with llama.cpp's
    own quantiser (``ggml_quantize_chunk``, no importance matrix): the bytes a GGUF stores, shaped
    ``[rows, bytes per row]`` as gguf-py reads them. Re-quantising an unchanged K-quant matrix gives
    back its bytes. Raises ``ExportError`` where it cannot (no llama-cpp-python; a row length that is
    not a whole number of the type's blocks; a type that needs an importance matrix)."""
    import numpy as np

    try:
        lib = _ggml()
    except (ImportError, OSError, AttributeError) as exc:
        raise ExportError(
            f"llama.cpp's quantiser is not available ({exc}): `pip install llama-cpp-python`"
        ) from None
    t = int(qtype)
    rows, n = arr.shape
    if n % lib.ggml_blck_size(t):
        raise ExportError(f"rows of {n} values are not whole {qtype.name} blocks of {lib.ggml_blck_size(t)}")
    if lib.ggml_quantize_requires_imatrix(t):
        raise ExportError(f"{qtype.name} needs an importance matrix to quantise")
    src = np.ascontiguousarray(arr, dtype=np.float32)
    out = np.empty((rows, lib.ggml_row_size(t, n)), dtype=np.uint8)
    lib.ggml_quantize_init(t)
    written = lib.ggml_quantize_chunk(t, src.ctypes.data, out.ctypes.data, 0, rows, n, None)
    if written != out.nbytes:
        raise ExportError(f"llama.cpp's quantiser wrote {written} bytes of {out.nbytes} for {qtype.name}")
    return out
