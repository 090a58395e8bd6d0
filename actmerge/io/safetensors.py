"""safetensors at the byte level: headers, a lazy tensor reader, and one shard rewriter.

Nothing is decoded unless a caller asks for a tensor: copying a shard copies byte ranges, so
untouched tensors stay byte-identical.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import queue
import shutil
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
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


MAP_BYTES = 1 << 20  # a tensor this large is read as a view of a private file mapping, not a copy


class Reader:
    """``read(name)`` → an original tensor; safetensors handles are opened on demand and closed on
    exit, so only the shards a caller reads from are ever open. A tensor of ``MAP_BYTES`` or more
    is a copy-on-write view of the file (no copy until written; the mapping lives as long as the
    tensor)."""

    def __init__(self, where: dict[str, Shard]):
        self.where = where
        self.stack = ExitStack()
        self.handles: dict[Path, object] = {}
        self.maps: dict[Path, mmap.mmap] = {}  # closed when the last tensor viewing one is freed

    def __enter__(self):
        return self.read

    def __exit__(self, *exc):
        self.stack.close()
        self.handles.clear()
        self.maps.clear()

    def read(self, name: str) -> torch.Tensor:
        shard = self.where[name]
        meta, path = shard.header[name], shard.path
        if nbytes(meta) >= MAP_BYTES and meta["dtype"] in DTYPES:  # zero-copy: a private mapping
            if path not in self.maps:
                with open(path, "rb") as f:
                    self.maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            dtype = DTYPES[meta["dtype"]]
            start, stop = meta["data_offsets"]
            count = (stop - start) // torch.empty((), dtype=dtype).element_size()
            offset = shard.data_start + start
            t = torch.frombuffer(self.maps[path], dtype=dtype, count=count, offset=offset).view(meta["shape"])
            # a product (b + W c) on a float32 weight itself may round differently at another
            # alignment: such a weight is a view only at the allocator's 64-byte alignment (other
            # dtypes are upcast into a fresh, aligned tensor first)
            return t if offset % 64 == 0 or dtype != torch.float32 else t.clone()
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


@dataclass(frozen=True)
class Streamed:
    """A tensor handed to the writer block by block: ``blocks()`` yields contiguous tensors of
    ``dtype`` whose bytes, concatenated, are the tensor's (storage order). The blocks are computed
    while the writer thread writes the previous ones."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    blocks: Callable[[], Iterator[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * torch.empty((), dtype=self.dtype).element_size()


Value = torch.Tensor | Streamed
ALIGN = 4096  # a rewritten header keeps the data section at the same offset modulo a page


def _meta(v: Value) -> tuple[str, list[int], int]:
    if isinstance(v, Streamed):
        return dtype_str(torch.empty((), dtype=v.dtype)), list(v.shape), v.nbytes
    return dtype_str(v), list(v.shape), v.numel() * v.element_size()


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


def write_shard(shard: Shard, values: dict[str, Value], dest: Path, drop: set[str] = frozenset()) -> None:
    """Copy ``shard`` to ``dest`` with ``values`` overwritten (same name) or appended (new name), and
    the tensors in ``drop`` left out.

    Nothing to change: the whole file is copied (``copy_file``: a reflink where the file system has
    one). Else one pass: the header (the original bytes when nothing is appended or dropped, else a
    rewritten one padded so the data section moves by whole pages), then the data section in offset
    order — untouched runs copied in-kernel, edited tensors written from memory or block by block
    (``Streamed``), each byte written once — then the appended tensors. A writer thread does the
    copies and writes while this thread computes the next block. ``values`` must hold only this
    shard's tensors (a new tensor is appended to the shard it is handed to)."""
    if not values and not drop:
        copy_file(shard.path, dest)
        return
    existing = shard.tensors()
    appended = {k: v for k, v in values.items() if k not in existing}
    for name, v in values.items():
        if name in appended:
            continue
        dt, _, n = _meta(v)
        if n != nbytes(existing[name]) or dt != existing[name]["dtype"]:
            raise AssertionError(f"{name}: edited tensor changed size or dtype")
    kept = sorted(
        ((n, m) for n, m in existing.items() if n not in drop), key=lambda x: x[1]["data_offsets"][0]
    )
    size = shard.path.stat().st_size
    with open(shard.path, "rb") as src, open(dest, "wb") as dst, _Writer(src, dst) as w:
        if not appended and not drop:  # same layout: the original header, byte for byte
            base, pos = shard.data_start, 0
            w.copy(0, 0, shard.data_start)
            for name, meta in kept:
                if name in values:
                    start, stop = meta["data_offsets"]
                    w.copy(base + pos, base + pos, start - pos)
                    _put(w, base + start, values[name], name)
                    pos = stop
            w.copy(base + pos, base + pos, size - base - pos)
            return
        header = {"__metadata__": shard.header["__metadata__"]} if "__metadata__" in shard.header else {}
        end, layout = 0, []
        for name, meta in kept:
            n = nbytes(meta)
            header[name] = {"dtype": meta["dtype"], "shape": meta["shape"], "data_offsets": [end, end + n]}
            layout.append((name, meta["data_offsets"][0], end, n))
            end += n
        for name, v in sorted(appended.items()):
            dt, shape, n = _meta(v)
            header[name] = {"dtype": dt, "shape": shape, "data_offsets": [end, end + n]}
            layout.append((name, None, end, n))
            end += n
        raw = encode_header(header, data_start_mod=shard.data_start % ALIGN)
        w.write(0, raw)
        base = len(raw)
        run = None  # consecutive untouched tensors are copied as one range: (src, dst, count)
        for name, s_off, d_off, n in layout:
            if name not in values:
                if run and run[0] + run[2] == s_off and run[1] + run[2] == d_off:
                    run = (run[0], run[1], run[2] + n)
                else:
                    if run:
                        w.copy(shard.data_start + run[0], base + run[1], run[2])
                    run = (s_off, d_off, n)
                continue
            if run:
                w.copy(shard.data_start + run[0], base + run[1], run[2])
                run = None
            _put(w, base + d_off, values[name], name)
        if run:
            w.copy(shard.data_start + run[0], base + run[1], run[2])


def _put(w: _Writer, offset: int, v: Value, name: str) -> None:
    if not isinstance(v, Streamed):
        w.write(offset, v.contiguous().reshape(-1).view(torch.uint8).numpy())
        return
    at, end = offset, offset + v.nbytes
    for block in v.blocks():
        if block.dtype != v.dtype or not block.is_contiguous():
            raise AssertionError(f"{name}: a block is not a contiguous {v.dtype} tensor")
        data = block.reshape(-1).view(torch.uint8).numpy()
        w.write(at, data)
        at += data.nbytes
    if at != end:
        raise AssertionError(f"{name}: blocks give {at - offset} bytes, the tensor has {end - offset}")


_PIECE = 64 << 20  # a copy is queued in pieces so that an interrupt stops the writer promptly


class _Writer:
    """One thread that performs copies and writes at explicit offsets, in order, from a bounded
    queue; the first error it meets is raised in the caller's thread (at the next call or on exit)."""

    def __init__(self, src, dst, depth: int = 4):
        self.src, self.dst = src.fileno(), dst.fileno()
        self.queue: queue.Queue = queue.Queue(depth)
        self.error: BaseException | None = None
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="actmerge-writer", daemon=True)

    def __enter__(self) -> _Writer:
        self.thread.start()
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None:
            self.stopped = True  # the rest of the queue is skipped
        self.queue.put(None)  # the thread keeps consuming, so this never blocks for long
        self.thread.join()
        if exc_type is None and self.error is not None:
            raise self.error

    def _run(self) -> None:
        while (job := self.queue.get()) is not None:
            if self.error is None and not self.stopped:
                try:
                    job()
                except BaseException as exc:  # noqa: BLE001 (re-raised in the caller's thread)
                    self.error = exc

    def _submit(self, job: Callable[[], None]) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(job, timeout=0.2)
                return
            except queue.Full:
                continue

    def write(self, offset: int, data) -> None:
        self._submit(lambda: _pwrite_all(self.dst, data, offset))

    def copy(self, src_offset: int, dst_offset: int, count: int) -> None:
        for k in range(0, count, _PIECE):
            n = min(_PIECE, count - k)
            self._submit(
                lambda a=src_offset + k, b=dst_offset + k, n=n: _copy_at(self.src, self.dst, a, b, n)
            )


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


_FATAL = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS)


def _copy_at(src: int, dst: int, src_offset: int, dst_offset: int, count: int) -> None:
    """``count`` bytes of ``src`` at ``src_offset`` to ``dst`` at ``dst_offset`` (in-kernel when
    possible, else read + write)."""
    try:
        while count > 0:
            n = os.copy_file_range(src, dst, count, src_offset, dst_offset)
            if n == 0:
                break
            count, src_offset, dst_offset = count - n, src_offset + n, dst_offset + n
        return
    except (AttributeError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno in _FATAL:
            raise
    while count > 0:
        block = os.pread(src, min(count, 16 << 20), src_offset)
        if not block:
            break
        _pwrite_all(dst, block, dst_offset)
        count, src_offset, dst_offset = count - len(block), src_offset + len(block), dst_offset + len(block)


FICLONE = 0x40049409  # ioctl(dst, FICLONE, src): share the extents (btrfs, XFS, bcachefs, ...)


def copy_file(src: Path, dest: Path) -> str:
    """Copy a whole file: a reflink where the file system has one, else ``copy_file_range`` of the
    whole file, else ``shutil.copyfile``. Returns which one did it."""
    with open(src, "rb") as s, open(dest, "wb") as d:
        try:
            import fcntl

            fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
            return "reflink"
        except (ImportError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno in _FATAL:
                raise
        try:
            size, off = os.fstat(s.fileno()).st_size, 0
            while off < size:
                n = os.copy_file_range(s.fileno(), d.fileno(), size - off, off, off)
                if n == 0:
                    break
                off += n
            if off == size:
                return "copy_file_range"
        except (AttributeError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno in _FATAL:
                raise
    shutil.copyfile(src, dest)
    return "copyfile"


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
