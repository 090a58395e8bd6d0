"""safetensors at the byte level: headers, a lazy tensor reader, and one shard rewriter.

Nothing is decoded unless a caller asks for a tensor: copying a shard copies byte ranges, so
untouched tensors stay byte-identical.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
import threading
from collections import deque
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


def write_shard(
    shard: Shard,
    values: dict[str, Value],
    dest: Path,
    drop: set[str] = frozenset(),
    writer: Writer | None = None,
) -> None:
    """Copy ``shard`` to ``dest`` with ``values`` overwritten (same name) or appended (new name), and
    the tensors in ``drop`` left out.

    Nothing to change: the whole file is copied (a reflink where the file system has one, else
    in-kernel copies). Else: the header (the original bytes when nothing is appended or dropped, else
    a rewritten one padded so the data section moves by whole pages), untouched runs of the data
    section copied in-kernel, edited tensors written from memory or block by block (``Streamed``,
    computed here while the writer thread writes the previous blocks), then the appended tensors;
    each byte is written once, at its offset. ``values`` must hold only this shard's tensors (a new
    tensor is appended to the shard it is handed to).

    With ``writer`` (one ``Writer`` for all the shards of a rewrite) this returns as soon as the work
    is queued, so the caller computes the next shard's tensors while this one is still being copied;
    the writer's ``close`` waits for all of it. Without, ``dest`` is complete on return."""
    if writer is None:
        with Writer() as w:
            write_shard(shard, values, dest, drop, w)
        return
    if not values and not drop:
        writer.copy_file(shard.path, dest)
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
    out = writer.open(shard.path, dest)
    try:
        _write_layout(writer, out, shard, values, appended, kept, size, drop)
    finally:
        writer.seal(out)


def _write_layout(
    w: Writer,
    out: _Out,
    shard: Shard,
    values: dict[str, Value],
    appended: dict[str, Value],
    kept: list[tuple[str, dict]],
    size: int,
    drop: set[str],
) -> None:
    """Queue the header, copies and writes of ``write_shard`` (see there) into ``out``."""
    if not appended and not drop:  # same layout: the original header, byte for byte
        base, pos = shard.data_start, 0
        w.copy(out, 0, 0, shard.data_start)
        for name, meta in kept:
            if name in values:
                start, stop = meta["data_offsets"]
                w.copy(out, base + pos, base + pos, start - pos)
                _put(w, out, base + start, values[name], name)
                pos = stop
        w.copy(out, base + pos, base + pos, size - base - pos)
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
    w.write(out, 0, raw)
    base = len(raw)
    run = None  # consecutive untouched tensors are copied as one range: (src, dst, count)
    for name, s_off, d_off, n in layout:
        if name not in values:
            if run and run[0] + run[2] == s_off and run[1] + run[2] == d_off:
                run = (run[0], run[1], run[2] + n)
            else:
                if run:
                    w.copy(out, shard.data_start + run[0], base + run[1], run[2])
                run = (s_off, d_off, n)
            continue
        if run:
            w.copy(out, shard.data_start + run[0], base + run[1], run[2])
            run = None
        _put(w, out, base + d_off, values[name], name)
    if run:
        w.copy(out, shard.data_start + run[0], base + run[1], run[2])


def _put(w: Writer, out: _Out, offset: int, v: Value, name: str) -> None:
    if not isinstance(v, Streamed):
        w.write(out, offset, v.contiguous().reshape(-1).view(torch.uint8).numpy())
        return
    at, end = offset, offset + v.nbytes
    for block in v.blocks():
        if block.dtype != v.dtype or not block.is_contiguous():
            raise AssertionError(f"{name}: a block is not a contiguous {v.dtype} tensor")
        data = block.reshape(-1).view(torch.uint8).numpy()
        w.write(out, at, data)
        at += data.nbytes
    if at != end:
        raise AssertionError(f"{name}: blocks give {at - offset} bytes, the tensor has {end - offset}")


_PIECE = 64 << 20  # a copy is queued in pieces so that an interrupt stops the writer promptly
HELD_BYTES = 256 << 20  # computed bytes waiting for the writer, at most (beyond: the caller writes)
OPEN_FILES = 8  # output files being written at once, at most (the caller runs this far ahead)


class _Out:
    """One output file being written and the file it is copied from; closed by the writer thread
    once sealed (nothing more will be queued) and its last job is done."""

    def __init__(self, src: Path, dest: Path):
        self.src = open(src, "rb")  # noqa: SIM115 (closed by close(), possibly in the writer thread)
        try:
            self.dst = open(dest, "wb")  # noqa: SIM115
        except BaseException:
            self.src.close()
            raise
        self.pending, self.sealed = 0, False

    def close(self) -> None:
        self.src.close()
        self.dst.close()


class Writer:
    """One thread that writes every output file of a rewrite: copies and writes at explicit offsets.

    Writes of computed bytes go first (they hold memory; past ``held`` bytes waiting, the caller
    writes the oldest itself); in-kernel copies fill the rest of the thread's time, file by file in
    the order queued. So the caller computes the next tensors, and the next shard's, while earlier
    ones are copied; at ``close`` it copies too, starting from the last file queued (another file
    than the thread's: writes to one file take its inode lock in turn). The first error the thread
    meets is raised in the caller's thread (at its next call or at ``close``); an exception in the
    caller (an interrupt) drops the queued work, stops the thread and closes the files."""

    def __init__(self, held: int = HELD_BYTES):
        self.cond = threading.Condition()
        self.data: deque = deque()  # (job, bytes, out): writes of computed bytes
        self.copies: dict[_Out, deque] = {}  # out → its in-kernel copies (job, 0, out), in order
        self.held, self.limit = 0, held
        self.error: BaseException | None = None
        self.stopped = self.closing = False
        self.outs: list[_Out] = []
        self.thread = threading.Thread(target=self._run, name="actmerge-writer", daemon=True)

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self._stop()

    def close(self) -> None:
        """Help with, then wait for, everything queued; raise the writer's error, if any."""
        try:
            while self.error is None and (job := self._take(steal=True)):
                self._do(job)
            with self.cond:
                self.closing = True
                self.cond.notify_all()
            while self.thread.is_alive():
                self.thread.join(0.2)  # in steps: an interrupt still reaches this thread
        except BaseException:
            self._stop()
            raise
        self._close_files()
        if self.error is not None:
            raise self.error

    def _stop(self) -> None:
        with self.cond:
            self.stopped = True  # the rest of the queue is dropped
            self.data.clear()
            self.copies.clear()
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join()  # the current job is at most one piece
        self._close_files()

    def _close_files(self) -> None:
        for out in self.outs:
            out.close()
        self.outs.clear()

    def _take(self, steal: bool = False) -> tuple | None:
        """The next job: a write first, else the next copy into the first file queued (with
        ``steal``: into the last one); None if none."""
        with self.cond:
            if self.stopped:
                return None
            if self.data:
                return self.data.popleft()
            if not self.copies:
                return None
            out = next(reversed(self.copies)) if steal else next(iter(self.copies))
            job = self.copies[out].popleft()
            if not self.copies[out]:
                del self.copies[out]
            return job

    def _do(self, job: tuple, catch: bool = False) -> None:
        fn, n, out = job
        try:
            if self.error is None:
                fn()
        except BaseException as exc:
            if not catch:
                raise
            self.error = exc  # re-raised in the caller's thread
        finally:
            with self.cond:
                self.held -= n
                out.pending -= 1
                if out.sealed and not out.pending:
                    self._retire(out)
                self.cond.notify_all()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not (self.data or self.copies or self.closing or self.stopped):
                    self.cond.wait()
            job = self._take()
            if job is None:
                with self.cond:
                    if self.stopped or (self.closing and not self.data and not self.copies):
                        return
                continue
            self._do(job, catch=True)

    def _retire(self, out: _Out) -> None:
        try:
            out.close()
        except OSError as exc:  # a write error reported at close (e.g. a full network file system)
            self.error = self.error or exc
        if out in self.outs:
            self.outs.remove(out)

    def _submit(self, job: Callable[[], None], n: int, out: _Out) -> None:
        """Queue a write of ``n`` computed bytes, or (``n`` = 0) a copy into ``out``."""
        while True:
            with self.cond:
                if self.error is not None:
                    raise self.error
                if not n or not self.held or self.held + n <= self.limit:
                    (self.data if n else self.copies.setdefault(out, deque())).append((job, n, out))
                    self.held += n
                    out.pending += 1
                    self.cond.notify_all()
                    return
                ahead = self.data.popleft() if self.data else None
            if ahead is None:  # the writer thread holds the bytes: wait for it
                with self.cond:
                    self.cond.wait(0.2)  # in steps: an interrupt still reaches this thread
            else:  # the writer is behind: write the oldest waiting block here
                self._do(ahead)

    def open(self, src: Path, dest: Path) -> _Out:
        """``dest`` created now, written by the queued jobs; ``seal`` it when nothing more is queued.
        With ``OPEN_FILES`` outputs unfinished, the caller copies (or waits) until one is done."""
        while True:
            with self.cond:
                if self.error is not None:
                    raise self.error
                if len(self.outs) < OPEN_FILES:
                    break
            job = self._take(steal=True)
            if job is None:
                with self.cond:
                    self.cond.wait(0.2)
            else:
                self._do(job)
        out = _Out(src, dest)
        with self.cond:
            self.outs.append(out)
        return out

    def seal(self, out: _Out) -> None:
        with self.cond:
            out.sealed = True
            if not out.pending:
                self._retire(out)

    def write(self, out: _Out, offset: int, data) -> None:
        n = memoryview(data).nbytes
        self._submit(lambda: _pwrite_all(out.dst.fileno(), data, offset), n, out)

    def copy(self, out: _Out, src_offset: int, dst_offset: int, count: int) -> None:
        for k in range(0, count, _PIECE):
            n = min(_PIECE, count - k)
            self._submit(
                lambda a=src_offset + k, b=dst_offset + k, n=n: _copy_at(
                    out.src.fileno(), out.dst.fileno(), a, b, n
                ),
                0,
                out,
            )

    def copy_file(self, src: Path, dest: Path) -> None:
        """A whole file: a reflink where the file system has one (now), else queued in-kernel copies."""
        out = self.open(src, dest)
        try:
            if not _reflink(out.src.fileno(), out.dst.fileno()):
                self.copy(out, 0, 0, os.fstat(out.src.fileno()).st_size)
        finally:
            self.seal(out)


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


def _reflink(src: int, dst: int) -> bool:
    try:
        import fcntl

        fcntl.ioctl(dst, FICLONE, src)
        return True
    except (ImportError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno in _FATAL:
            raise
        return False


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
