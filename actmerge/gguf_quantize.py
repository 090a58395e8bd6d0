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
