"""Streaming checkpoint writer (DESIGN.md §6).

Each output shard is the input shard copied at the byte level (the OS's copy path), then the
planned tensors are overwritten in place: untouched tensors stay byte-identical and nothing but
the edited tensors is ever materialised. A shard that gains tensors (new biases) gets a new
header; its data region is still copied as bytes and the new tensors are appended. Shard names and
the HF index are kept. Everything goes to a temp dir beside the output, renamed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import OutputExistsError
from .fold import FoldPlan, TensorInfo

INDEX = "model.safetensors.index.json"
# other weight formats in a source dir would go stale next to rewritten safetensors
STALE_WEIGHTS = (".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf", ".ckpt", ".onnx")
PROVENANCE_DIR = "actmerge"

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


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


def read_shard(path: Path) -> Shard:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return Shard(path, n, header)


def tensor_index(files: Iterable[Path]) -> tuple[dict[str, TensorInfo], dict[str, Shard]]:
    """(name → shape/dtype, name → shard) over all safetensors files of a checkpoint."""
    infos, where = {}, {}
    for path in files:
        shard = read_shard(path)
        for name, meta in shard.tensors().items():
            infos[name] = TensorInfo(tuple(meta["shape"]), meta["dtype"])
            where[name] = shard
    return infos, where


def _to_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _encode_header(header: dict) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data region 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


def check_output(out: Path, source: Path, force: bool) -> None:
    out_r, src_r = out.resolve(), source.resolve()
    if out_r == src_r or out_r.is_relative_to(src_r) or src_r.is_relative_to(out_r):
        raise OutputExistsError(
            f"output {out} overlaps the source checkpoint {source}: choose another -o directory."
        )
    if out.exists() and not force:
        raise OutputExistsError(
            f"output {out} already exists: choose another -o directory or pass --force to replace it."
        )


def write_checkpoint(
    source: Path,
    files: list[Path],
    plan: FoldPlan | None,
    out: Path,
    *,
    config_patch: dict | None = None,
    extra: dict[str, bytes] | None = None,
    force: bool = False,
    progress: Callable[[Iterable, int, str], Iterable] | None = None,
) -> Path:
    """Write the baked checkpoint to ``out`` (atomically). ``extra``: relative path → bytes."""
    check_output(out, source, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_weights(files, plan, tmp, progress)
        _copy_side_files(source, tmp)
        _write_config(source, tmp, config_patch or {})
        for rel, data in (extra or {}).items():
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_weights(files: list[Path], plan: FoldPlan | None, tmp: Path, progress) -> None:
    infos, where = tensor_index(files)
    edited = plan.edited_tensors() if plan else {}
    new = plan.new_tensors if plan else {}
    # the shard each edited module's new tensors land in: where its weight lives
    by_shard: dict[Path, set[str]] = {}
    for name, module in edited.items():
        anchor = name if name in where else new[name][0]
        by_shard.setdefault(where[anchor].path, set()).add(module)
    added: dict[Path, list[str]] = {}
    for name, (anchor, _) in new.items():
        added.setdefault(where[anchor].path, []).append(name)

    it = progress(files, len(files), "writing shards") if progress else files
    for path in it:
        shard = read_shard(path)
        values: dict[str, torch.Tensor] = {}
        with _Reader(where) as read:  # input shards are opened for this output shard only
            for module in sorted(by_shard.get(path, ())):
                values.update(plan.compute(module, read))
        for name in added.get(path, []):
            if name not in values:  # a companion bias a new flag requires: zeros
                info = new[name][1]
                values[name] = torch.zeros(info.shape, dtype=_DTYPES[info.dtype])
        _write_shard(shard, values, tmp / path.name)
        values.clear()
    index = files[0].parent / INDEX
    if index.is_file():
        data = json.loads(index.read_text())
        for name, (anchor, _) in new.items():
            data["weight_map"][name] = where[anchor].path.name
        data["weight_map"] = dict(sorted(data["weight_map"].items()))
        total = 0
        for f in files:
            total += sum(_nbytes(m) for m in read_shard(tmp / f.name).tensors().values())
        data.setdefault("metadata", {})["total_size"] = total
        (tmp / INDEX).write_text(json.dumps(data, indent=2) + "\n")


class _Reader:
    """``read(name)`` → an original tensor, with safetensors handles closed on exit."""

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


def _nbytes(meta: dict) -> int:
    return meta["data_offsets"][1] - meta["data_offsets"][0]


def _write_shard(shard: Shard, values: dict[str, torch.Tensor], dest: Path) -> None:
    """Copy ``shard`` to ``dest`` byte for byte, with ``values`` overwritten or appended.

    One pass: the header (the original bytes, or a rewritten one when tensors are appended), then the
    data section in offset order — untouched runs copied in-kernel, edited tensors written from
    memory (each byte written once) — then the appended tensors."""
    existing = shard.tensors()
    appended = {k: v for k, v in values.items() if k not in existing}
    edited: list[tuple[int, int, bytes]] = []
    for name, t in values.items():
        if name in appended:
            continue
        meta = existing[name]
        raw = _to_bytes(t)
        if len(raw) != _nbytes(meta) or _dtype_str(t) != meta["dtype"]:
            raise AssertionError(f"{name}: edited tensor changed size or dtype")
        edited.append((meta["data_offsets"][0], meta["data_offsets"][1], raw))
    edited.sort(key=lambda e: e[0])
    size = shard.path.stat().st_size
    with open(shard.path, "rb") as src, open(dest, "wb") as dst:
        if appended:
            header = dict(shard.header)
            end = max((m["data_offsets"][1] for m in existing.values()), default=0)
            for name, t in sorted(appended.items()):
                n = t.numel() * t.element_size()
                header[name] = {
                    "dtype": _dtype_str(t),
                    "shape": list(t.shape),
                    "data_offsets": [end, end + n],
                }
                end += n
            dst.write(_encode_header(header))
            dst.flush()
        else:
            _copy_range(src, dst, 0, shard.data_start)  # the original header, byte for byte
        pos = 0  # offset within the source's data section
        for start, stop, raw in edited:
            _copy_range(src, dst, shard.data_start + pos, start - pos)
            dst.write(raw)
            dst.flush()
            pos = stop
        _copy_range(src, dst, shard.data_start + pos, size - shard.data_start - pos)
        for _name, t in sorted(appended.items()):
            dst.write(_to_bytes(t))


def _copy_range(src, dst, offset: int, count: int) -> None:
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
    except (AttributeError, OSError):  # no copy_file_range (other OS / filesystem): plain copy
        src.seek(offset)
        dst.seek(dst_off)
        while count > 0:
            block = src.read(min(count, 16 << 20))
            if not block:
                break
            dst.write(block)
            count -= len(block)


def _dtype_str(t: torch.Tensor) -> str:
    for k, v in _DTYPES.items():
        if v == t.dtype:
            return k
    raise ValueError(f"unsupported dtype {t.dtype}")


def _copy_side_files(source: Path, tmp: Path) -> None:
    """Tokenizer, chat template, generation config and the rest, verbatim (symlinks resolved)."""
    for p in sorted(source.rglob("*")):
        rel = p.relative_to(source)
        if any(part.startswith(".") for part in rel.parts) or p.is_dir():
            continue
        if p.suffix == ".safetensors" or p.name in (INDEX, "config.json", "README.md"):
            continue
        if p.suffix in STALE_WEIGHTS or rel.parts[0] == PROVENANCE_DIR:
            continue
        dest = tmp / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dest)


def _write_config(source: Path, tmp: Path, patch: dict) -> None:
    src = source / "config.json"
    if not patch:
        shutil.copyfile(src, tmp / "config.json")
        return
    config = json.loads(src.read_text())
    for dotted, value in patch.items():
        node = config
        *path, last = dotted.split(".")
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
