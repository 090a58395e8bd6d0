"""safetensors at the byte level: headers, a lazy tensor reader, and one shard rewriter.

Nothing is decoded unless a caller asks for a tensor: copying a shard copies byte ranges, so
untouched tensors stay byte-identical.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

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


class Reader:
    """``read(name)`` → an original tensor; safetensors handles are opened on demand and closed on
    exit, so only the shards a caller reads from are ever open."""

    def __init__(self, where: dict[str, Shard]):
        self.where = where
        self.stack = ExitStack()
        self.handles: dict[Path, object] = {}

    def __enter__(self):
        return self.read

    def __exit__(self, *exc):
        self.stack.close()
        self.handles.clear()

    def read(self, name: str) -> torch.Tensor:
        path = self.where[name].path
        if path not in self.handles:
            self.handles[path] = self.stack.enter_context(safe_open(str(path), framework="pt"))
        return self.handles[path].get_tensor(name)


def nbytes(meta: dict) -> int:
    return meta["data_offsets"][1] - meta["data_offsets"][0]


def dtype_str(t: torch.Tensor) -> str:
    for k, v in DTYPES.items():
        if v == t.dtype:
            return k
    raise ValueError(f"unsupported dtype {t.dtype}")


def to_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def encode_header(header: dict) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data region 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


def write_shard(
    shard: Shard, values: dict[str, torch.Tensor], dest: Path, drop: set[str] = frozenset()
) -> None:
    """Copy ``shard`` to ``dest`` with ``values`` overwritten (same name) or appended (new name), and
    the tensors in ``drop`` left out.

    One pass: the header (the original bytes when nothing is appended or dropped, else a rewritten
    one), then the data section in offset order — untouched runs copied in-kernel, edited tensors
    written from memory, each byte written once — then the appended tensors. ``values`` must hold
    only this shard's tensors (a new tensor is appended to the shard it is handed to)."""
    existing = shard.tensors()
    appended = {k: v for k, v in values.items() if k not in existing}
    edited: dict[str, bytes] = {}
    for name, t in values.items():
        if name in appended:
            continue
        raw = to_bytes(t)
        if len(raw) != nbytes(existing[name]) or dtype_str(t) != existing[name]["dtype"]:
            raise AssertionError(f"{name}: edited tensor changed size or dtype")
        edited[name] = raw
    kept = sorted(
        ((n, m) for n, m in existing.items() if n not in drop), key=lambda x: x[1]["data_offsets"][0]
    )
    with open(shard.path, "rb") as src, open(dest, "wb") as dst:
        if not appended and not drop:
            copy_range(src, dst, 0, shard.data_start)  # the original header, byte for byte
            pos = 0  # offset within the source's data section
            for start, stop, raw in sorted(
                (existing[n]["data_offsets"][0], existing[n]["data_offsets"][1], r) for n, r in edited.items()
            ):
                copy_range(src, dst, shard.data_start + pos, start - pos)
                dst.write(raw)
                dst.flush()
                pos = stop
            copy_range(src, dst, shard.data_start + pos, shard.path.stat().st_size - shard.data_start - pos)
            return
        header = {"__metadata__": shard.header["__metadata__"]} if "__metadata__" in shard.header else {}
        end = 0
        for name, meta in kept:
            n = nbytes(meta)
            header[name] = {"dtype": meta["dtype"], "shape": meta["shape"], "data_offsets": [end, end + n]}
            end += n
        for name, t in sorted(appended.items()):
            n = t.numel() * t.element_size()
            header[name] = {"dtype": dtype_str(t), "shape": list(t.shape), "data_offsets": [end, end + n]}
            end += n
        dst.write(encode_header(header))
        dst.flush()
        run = None  # consecutive untouched tensors are copied as one range
        for name, meta in kept:
            start, stop = meta["data_offsets"]
            if name not in edited:
                run = (
                    (run[0], stop)
                    if run and run[1] == start
                    else (_flush(src, dst, shard, run) or (start, stop))
                )
                continue
            _flush(src, dst, shard, run)
            run = None
            dst.write(edited[name])
            dst.flush()
        _flush(src, dst, shard, run)
        for _name, t in sorted(appended.items()):
            dst.write(to_bytes(t))


def _flush(src, dst, shard: Shard, run: tuple[int, int] | None) -> None:
    if run is not None:
        copy_range(src, dst, shard.data_start + run[0], run[1] - run[0])


def copy_range(src, dst, offset: int, count: int) -> None:
    """Copy ``count`` bytes of ``src`` from ``offset`` to ``dst`` at its current position, which ends
    after the copied bytes (in-kernel when possible). ``dst`` must be flushed."""
    dst_off = dst.tell()
    try:
        while count > 0:
            n = os.copy_file_range(src.fileno(), dst.fileno(), count, offset, dst_off)
            if n == 0:
                break
            count, offset, dst_off = count - n, offset + n, dst_off + n
        dst.seek(dst_off)  # copy_file_range with explicit offsets leaves the file position alone
    except (AttributeError, OSError) as exc:  # no copy_file_range here: a plain copy
        import errno

        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
            raise
        src.seek(offset)
        dst.seek(dst_off)
        while count > 0:
            block = src.read(min(count, 16 << 20))
            if not block:
                break
            dst.write(block)
            count -= len(block)


class TensorNamer:
    """A module parameter name (``named_parameters()``) → the checkpoint's tensor name: exact, or
    through the row's prefix aliases, tried both ways (transformers 5 builds CLIPTextModel without
    ``text_model.``; older checkpoints name its tensors with it)."""

    def __init__(self, tensors: dict[str, TensorInfo], prefixes: Iterable[tuple[str, str]] = ()):
        self.tensors = tensors
        self.prefixes = tuple(prefixes)

    def __call__(self, name: str) -> str | None:
        if name in self.tensors:
            return name
        for a, b in self.prefixes:
            for src, dst in ((a, b), (b, a)):
                if name.startswith(src) and dst + name[len(src) :] in self.tensors:
                    return dst + name[len(src) :]
        return None
