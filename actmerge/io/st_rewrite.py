"""One shard rewriter: a safetensors file copied with some tensors overwritten, appended or left
out. Untouched byte ranges are copied (in-kernel, by ``st_writer.Writer``), never decoded, so
untouched tensors stay byte-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .st_format import ALIGN, Shard, dtype_str, encode_header, nbytes
from .st_writer import OutFile, Writer


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


def _meta(v: Value) -> tuple[str, list[int], int]:
    if isinstance(v, Streamed):
        return dtype_str(torch.empty((), dtype=v.dtype)), list(v.shape), v.nbytes
    return dtype_str(v), list(v.shape), v.numel() * v.element_size()


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
    out: OutFile,
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


def _put(w: Writer, out: OutFile, offset: int, v: Value, name: str) -> None:
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
