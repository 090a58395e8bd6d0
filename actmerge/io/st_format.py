"""safetensors at the byte level: the dtype table, a shard's header (read and checked against the
file, or encoded for a rewrite) and the tensor index of a weight set.

Nothing here decodes a tensor: readers (``st_reader``) and the shard rewriter (``st_rewrite``) work
from these headers, so untouched tensors stay byte-identical.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointFormatError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string, e.g. "F32", "BF16"


@dataclass(frozen=True)
class Shard:
    path: Path
    header_len: int
    header: dict  # name → {dtype, shape, data_offsets}, plus "__metadata__"

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    def tensors(self) -> dict[str, dict]:
        return {k: v for k, v in self.header.items() if k != "__metadata__"}


def _bad(path: Path, why: str) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"{path} is not a valid safetensors file ({why}): re-download or re-bake the checkpoint."
    )


def read_shard(path: Path) -> Shard:
    """The header of one safetensors file, checked against the file's size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise _bad(path, "shorter than a header")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise _bad(path, f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _bad(path, f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    shard = Shard(path, n, header)
    end = 0
    for name, meta in shard.tensors().items():
        try:
            start, stop = meta["data_offsets"]
            meta["dtype"], meta["shape"]  # noqa: B018
        except (KeyError, TypeError, ValueError):
            raise _bad(path, f"entry {name!r} lacks dtype/shape/data_offsets") from None
        if not 0 <= start <= stop:
            raise _bad(path, f"entry {name!r} has offsets {start}..{stop}")
        end = max(end, stop)
    if shard.data_start + end > size:
        raise _bad(path, f"truncated: data ends at byte {shard.data_start + end} of {size}")
    return shard


def tensor_index(files: Iterable[Path]) -> tuple[dict[str, TensorInfo], dict[str, Shard]]:
    """(name → shape/dtype, name → shard) over all safetensors files of one weight set."""
    infos, where = {}, {}
    for path in files:
        shard = read_shard(path)
        for name, meta in shard.tensors().items():
            infos[name] = TensorInfo(tuple(meta["shape"]), meta["dtype"])
            where[name] = shard
    return infos, where


def nbytes(meta: dict) -> int:
    return meta["data_offsets"][1] - meta["data_offsets"][0]


def dtype_str(t: torch.Tensor) -> str:
    for k, v in DTYPES.items():
        if v == t.dtype:
            return k
    raise ValueError(f"unsupported dtype {t.dtype}")


def to_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


ALIGN = 4096  # a rewritten header keeps the data section at the same offset modulo a page


def encode_header(header: dict, data_start_mod: int | None = None) -> bytes:
    """Length + JSON header, padded with spaces to keep the data region 8-byte aligned (as
    safetensors does) or, with ``data_start_mod``, so that the data section starts at that offset
    modulo ``ALIGN`` (the original data then moves by whole pages: page-aligned in-kernel copies)."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    if data_start_mod is None:
        raw += b" " * (-len(raw) % 8)
    else:
        raw += b" " * ((data_start_mod - 8 - len(raw)) % ALIGN)
    return struct.pack("<Q", len(raw)) + raw
